//! The protocol-free core: what a request means, whichever face it came
//! through. [`args`] are the requests' arguments; [`inference`] does each
//! call (generation whole or streamed, function calls, the mood's controls,
//! the metrics) through the engine's handle, with [`controls`] validating
//! sampling and stops, [`calls`] setting up tool calls and JSON replies and
//! reading them back, [`streams`] keeping the polled streams, [`mood`] the
//! live emotional state and [`metrics`] the counts. Failures are
//! [`RequestError`]s of a kind each face maps onto its own shape.
//!
//! Nothing here knows MCP, OpenAI, HTTP or stdio: the faces import the
//! core, never the other way round.

pub mod args;
pub mod calls;
pub mod controls;
pub mod error;
pub mod inference;
pub mod metrics;
pub mod mood;
pub mod streams;

pub use args::{Controls, FunctionCallArgs, GenerateArgs, UpdateEmotionArgs};
pub use error::{ErrorKind, RequestError};
pub use inference::{Inference, Progress, EMOTION_EVENTS_URI, EMOTION_STATE_URI, METRICS_URI};
pub use mood::{unix_now, Mood};
pub use streams::Owner;
