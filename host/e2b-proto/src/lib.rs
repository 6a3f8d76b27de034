//! E2B's in-sandbox services, `process.Process` and `filesystem.Filesystem`, as message types
//! generated from E2B's published `.proto` files (`proto/`, pinned there with their licence).
//! Every message serializes to and from protobuf's canonical JSON form, the form E2B's SDKs send
//! over Connect's JSON codec: lowerCamelCase names (the proto names are accepted too), enums by
//! name (or number), 64-bit integers as strings, bytes as base64, oneofs inlined, default values
//! left out, and fields these definitions do not know ignored.

/// `package process`: programs started, followed, fed, signalled and resized.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `package filesystem`: entries stated, listed, made, moved, removed and watched.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

/// protobuf's `Timestamp`, as the messages above carry it.
pub use pbjson_types::Timestamp;

#[cfg(test)]
mod tests {
    use super::filesystem::{self, watch_dir_response};
    use super::process::{self, process_event, process_selector};

    #[test]
    fn oneofs_are_inlined_and_bytes_are_base64() {
        let data = process::StartResponse {
            event: Some(process::ProcessEvent {
                event: Some(process_event::Event::Data(process_event::DataEvent {
                    output: Some(process_event::data_event::Output::Stdout(b"hi\n".to_vec())),
                })),
            }),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let start = filesystem::WatchDirResponse {
            event: Some(watch_dir_response::Event::Start(
                watch_dir_response::StartEvent {},
            )),
        };
        assert_eq!(serde_json::to_string(&start).unwrap(), r#"{"start":{}}"#);
    }

    #[test]
    fn requests_take_names_or_numbers_and_ignore_unknown_fields() {
        let by_name: process::SendSignalRequest = serde_json::from_str(
            r#"{"process":{"pid":3},"signal":"SIGNAL_SIGKILL","sent":"later"}"#,
        )
        .unwrap();
        let by_number: process::SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":3},"signal":9}"#).unwrap();
        assert_eq!(by_name, by_number);
        assert_eq!(by_name.signal(), process::Signal::Sigkill);
        assert_eq!(
            by_name.process.unwrap().selector,
            Some(process_selector::Selector::Pid(3))
        );
        assert!(
            serde_json::from_str::<process::SendSignalRequest>(r#"{"signal":19}"#).is_err(),
            "a signal the definitions do not name"
        );
        let snake: filesystem::WatchDirRequest =
            serde_json::from_str(r#"{"path":"/a","include_entry":true}"#).unwrap();
        assert!(snake.include_entry);
    }

    #[test]
    fn sizes_are_strings_and_times_are_rfc_3339() {
        let entry = filesystem::EntryInfo {
            name: "a".into(),
            r#type: filesystem::FileType::File.into(),
            size: 5,
            modified_time: Some(super::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["size"], "5");
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert!(
            json["modifiedTime"]
                .as_str()
                .unwrap()
                .starts_with("2023-11-14T22:13:20"),
            "{json}"
        );
        assert!(json.get("mode").is_none(), "defaults are left out");
    }
}
