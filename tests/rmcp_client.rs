//! rmcp's own client (another independent MCP implementation) against the
//! real binary: tools with their schemas and annotations, a call with
//! structured content, a failure, and the resources.

mod common;

use rmcp::model::{CallToolRequestParams, ReadResourceRequestParams};
use rmcp::transport::TokioChildProcess;
use rmcp::ServiceExt;
use serde_json::{json, Value};

#[test]
fn rmcp_client_lists_and_calls() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_elpis-server"));
        command
            .env("ELPIS_MODEL_PATH", common::model_path())
            .env("ELPIS_MODEL_N_THREADS", "1")
            .env("ELPIS_MODEL_SEED", common::SEED)
            .env("ELPIS_EMOTION_STEERING", "off")
            // Drafts are sized by timing, and batched verification rounds
            // differently at near-ties: off, unless a test turns it on.
            .env("ELPIS_MODEL_SPECULATIVE", "off")
            // Saved prompts would carry over from test to test: none, unless a test wants them.
            .env("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0")
            .env("ELPIS_LOGGING_LEVEL", "error")
            .env_remove("ELPIS_QUIET");
        let client = ().serve(TokioChildProcess::new(command).unwrap()).await.unwrap();
        let tools = client.list_all_tools().await.unwrap();
        assert_eq!(tools.len(), 9);
        for tool in &tools {
            assert!(tool.output_schema.is_some() && tool.annotations.is_some() && tool.title.is_some(), "{tool:?}");
        }
        let get_emotion = tools.iter().find(|t| t.name == "get_emotion").unwrap();
        assert_eq!(get_emotion.annotations.as_ref().unwrap().read_only_hint, Some(true));

        let args = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0});
        let result = client
            .call_tool(CallToolRequestParams::new("generate").with_arguments(args.as_object().unwrap().clone()))
            .await
            .unwrap();
        assert_eq!(result.is_error, Some(false));
        let text = result.content[0].as_text().unwrap().text.clone();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(result.structured_content.as_ref(), Some(&value));
        assert!(value["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{value}");

        let bad = client
            .call_tool(CallToolRequestParams::new("generate_stream_read").with_arguments(json!({"stream_id": "x"}).as_object().unwrap().clone()))
            .await
            .unwrap();
        assert_eq!(bad.is_error, Some(true));
        assert!(bad.content[0].as_text().unwrap().text.contains("unknown stream_id"));

        let events = client.read_resource(ReadResourceRequestParams::new("emotion://events")).await.unwrap();
        assert_eq!(events.contents.len(), 1);
        client.cancel().await.unwrap();
    });
}
