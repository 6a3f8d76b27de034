//! The client end of the daemon's API, for the CLI and the tests.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use agentos_protocol::{FrameError, FrameReader, write_frame};
use serde::de::DeserializeOwned;

use super::api::{ApiError, Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agentos daemon at {path}: {source}; start it with `agentos daemon` (or pass --socket PATH)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the connection to the daemon failed: {0}")]
    Frame(#[from] FrameError),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("the daemon's answer is not what this client expects: {0}")]
    Unexpected(serde_json::Error),
    #[error("{0}")]
    Api(ApiError),
}

pub struct Client {
    writer: UnixStream,
    reader: FrameReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(connect_error)?;
        let reader = FrameReader::new(writer.try_clone().map_err(connect_error)?);
        Ok(Self { writer, reader })
    }

    /// Sends `request` and reads its answer.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        write_frame(&mut self.writer, request)?;
        match self.reader.read::<Reply>()? {
            Some(Reply::Ok(value)) => {
                serde_json::from_value(value).map_err(ClientError::Unexpected)
            }
            Some(Reply::Error(error)) => Err(ClientError::Api(error)),
            None => Err(ClientError::Closed),
        }
    }
}
