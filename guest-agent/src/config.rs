//! The agent's configuration: `/etc/agentos/init.json`, written into the image by the image builder.
//!
//! ```json
//! {
//!   "modules": ["/lib/modules/virtio_ring.ko", "/lib/modules/virtio.ko"],
//!   "transport": {"vsock": {"port": 1024}},
//!   "listen_port": 52,
//!   "hostname": "agent",
//!   "env": {"PATH": "/usr/bin:/bin", "HOME": "/root"}
//! }
//! ```
//!
//! - `modules` (optional, default none): absolute paths of kernel modules, loaded in this order
//!   before the transport opens. A module the kernel already has is not an error.
//! - `transport` (required), exactly one of:
//!   - `{"vsock": {"port": P}}`: dial the host (CID 2) on vsock port `P`, normally
//!     [`AGENT_CONTROL_PORT`](agentos_protocol::AGENT_CONTROL_PORT);
//!   - `{"serial": {"name": N}}`: speak over the virtio-serial port named `N`, normally
//!     [`CARRIER_PORT_NAME`](agentos_protocol::CARRIER_PORT_NAME) (the carrier VM).
//! - `listen_port` (optional, vsock only, default
//!   [`AGENT_LISTEN_PORT`](agentos_protocol::AGENT_LISTEN_PORT)): vsock port on which the agent also
//!   accepts connections the host opens.
//! - `hostname` (optional): host name of the VM; letters, digits, `-` and `.`, at most 64 bytes.
//! - `env` (optional): the base environment of every program the agent runs; a request's own
//!   variables are added on top. `PATH` is [`DEFAULT_PATH`] unless given here.
//!
//! Unknown fields are errors: a typo in an image must fail its first boot, not be ignored.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use agentos_protocol::AGENT_LISTEN_PORT;
use serde::Deserialize;

/// Where the image builder puts the configuration.
pub const CONFIG_PATH: &str = "/etc/agentos/init.json";

/// `PATH` of programs when the configuration names none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The file is a few lines; anything larger is not a configuration.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Linux's `HOST_NAME_MAX`.
const MAX_HOSTNAME_BYTES: usize = 64;

/// `VMADDR_PORT_ANY`: not a port one can dial or listen on.
const VSOCK_PORT_ANY: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {CONFIG_PATH}")]
    Read(#[source] io::Error),
    #[error("{CONFIG_PATH} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("{CONFIG_PATH} is malformed")]
    Syntax(#[from] serde_json::Error),
    #[error("{CONFIG_PATH} is invalid: {0}")]
    Invalid(String),
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub modules: Vec<PathBuf>,
    pub transport: Transport,
    pub hostname: Option<String>,
    /// Base environment of programs, `PATH` included.
    pub env: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Vsock { port: u32, listen_port: u32 },
    Serial { name: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    modules: Vec<PathBuf>,
    transport: RawTransport,
    #[serde(default)]
    listen_port: Option<u32>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RawTransport {
    Vsock { port: u32 },
    Serial { name: String },
}

impl Config {
    /// Reads and validates [`CONFIG_PATH`].
    pub fn load() -> Result<Self, ConfigError> {
        let mut text = String::new();
        File::open(CONFIG_PATH)
            .and_then(|file| file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(ConfigError::Read)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge);
        }
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        for module in &raw.modules {
            if !module.is_absolute() {
                return invalid(format!("module path {module:?} is not absolute"));
            }
        }
        let transport = match raw.transport {
            RawTransport::Vsock { port } => {
                let listen_port = raw.listen_port.unwrap_or(AGENT_LISTEN_PORT);
                if port == VSOCK_PORT_ANY || listen_port == VSOCK_PORT_ANY {
                    return invalid(format!("vsock port {VSOCK_PORT_ANY} is reserved"));
                }
                Transport::Vsock { port, listen_port }
            }
            RawTransport::Serial { name } => {
                if raw.listen_port.is_some() {
                    return invalid("listen_port applies to the vsock transport only".into());
                }
                if name.is_empty() {
                    return invalid("the serial port name is empty".into());
                }
                Transport::Serial { name }
            }
        };
        if let Some(name) = &raw.hostname {
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
            if name.is_empty() || name.len() > MAX_HOSTNAME_BYTES || !name.chars().all(allowed) {
                return invalid(format!("hostname {name:?} is not a valid host name"));
            }
        }
        for (key, value) in &raw.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return invalid(format!("environment variable {key:?} cannot be set"));
            }
        }
        let mut env = raw.env;
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        Ok(Self {
            modules: raw.modules,
            transport,
            hostname: raw.hostname,
            env,
        })
    }
}

fn invalid<T>(problem: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_vsock_configuration() {
        let config = Config::parse(
            r#"{
                "modules": ["/lib/modules/virtio_ring.ko", "/lib/modules/virtio.ko"],
                "transport": {"vsock": {"port": 1024}},
                "listen_port": 60,
                "hostname": "agent-1",
                "env": {"PATH": "/bin", "HOME": "/root"}
            }"#,
        )
        .unwrap();
        assert_eq!(
            config,
            Config {
                modules: vec![
                    "/lib/modules/virtio_ring.ko".into(),
                    "/lib/modules/virtio.ko".into()
                ],
                transport: Transport::Vsock {
                    port: 1024,
                    listen_port: 60
                },
                hostname: Some("agent-1".into()),
                env: BTreeMap::from([
                    ("HOME".into(), "/root".into()),
                    ("PATH".into(), "/bin".into())
                ]),
            }
        );
    }

    #[test]
    fn fills_defaults_for_a_minimal_configuration() {
        let config = Config::parse(r#"{"transport": {"vsock": {"port": 1024}}}"#).unwrap();
        assert!(config.modules.is_empty());
        assert_eq!(config.hostname, None);
        assert_eq!(
            config.transport,
            Transport::Vsock {
                port: 1024,
                listen_port: AGENT_LISTEN_PORT
            }
        );
        assert_eq!(
            config.env,
            BTreeMap::from([("PATH".into(), DEFAULT_PATH.into())])
        );
    }

    #[test]
    fn parses_a_serial_transport() {
        let config = Config::parse(
            r#"{"transport": {"serial": {"name": "agentos.ctl"}}, "env": {"HOME": "/"}}"#,
        )
        .unwrap();
        assert_eq!(
            config.transport,
            Transport::Serial {
                name: "agentos.ctl".into()
            }
        );
        assert_eq!(config.env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn rejects_malformed_configurations() {
        for text in [
            "",
            "[]",
            r#"{"modules": []}"#,
            r#"{"transport": {"vsock": {"port": 1024}}, "extra": 1}"#,
            r#"{"transport": {"vsock": {"port": 1024, "cid": 3}}}"#,
            r#"{"transport": {"vsock": {"port": 1024}, "serial": {"name": "x"}}}"#,
            r#"{"transport": {"pipe": {}}}"#,
            r#"{"transport": {"vsock": {"port": -1}}}"#,
        ] {
            assert!(
                matches!(Config::parse(text), Err(ConfigError::Syntax(_))),
                "accepted {text}"
            );
        }
    }

    #[test]
    fn rejects_invalid_values() {
        for text in [
            r#"{"modules": ["virtio.ko"], "transport": {"vsock": {"port": 1024}}}"#,
            r#"{"transport": {"vsock": {"port": 4294967295}}}"#,
            r#"{"transport": {"serial": {"name": "x"}}, "listen_port": 52}"#,
            r#"{"transport": {"serial": {"name": ""}}}"#,
            r#"{"transport": {"vsock": {"port": 1024}}, "hostname": "a/b"}"#,
            r#"{"transport": {"vsock": {"port": 1024}}, "hostname": ""}"#,
            r#"{"transport": {"vsock": {"port": 1024}}, "env": {"A=B": "1"}}"#,
            r#"{"transport": {"vsock": {"port": 1024}}, "env": {"A": "x\u0000y"}}"#,
        ] {
            assert!(
                matches!(Config::parse(text), Err(ConfigError::Invalid(_))),
                "accepted {text}"
            );
        }
    }
}
