//! Tools in the prompt, and tool calls read back out of generated text.
//!
//! A chat template that knows tools (its source uses `tools`) gets them as transformers passes
//! them: a `tools` variable of `{"type": "function", "function": {...}}` objects, assistant
//! messages' `tool_calls` and `role: "tool"` messages as they are. A template that does not is
//! given them in text, in the format Qwen2.5 and Hermes models are trained on: the tool list in
//! the system message, each call as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//! in the assistant's text, each result as `<tool_response>` in a user message. Generated text is
//! read back in that same format. `chat_template` writes the messages; this module holds the
//! format.

use serde::Serialize;
use serde_json::{Value, json};

pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";
pub const RESPONSE_OPEN: &str = "<tool_response>";
pub const RESPONSE_CLOSE: &str = "</tool_response>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of its arguments.
    pub parameters: Value,
}

impl Tool {
    /// As OpenAI and transformers write it: `{"type": "function", "function": {...}}`.
    pub fn to_json(&self) -> Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(description) = &self.description {
            function.insert("description".into(), description.clone().into());
        }
        function.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": function})
    }
}

/// A call of a tool: sent back in an assistant message, or read out of generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object (as the model wrote it, when it is not valid JSON).
    pub arguments: Value,
}

/// transformers' shape, which templates index: `{"type": "function", "function": {"name",
/// "arguments"}}`.
impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        json!({"type": "function", "function": {"name": self.name, "arguments": self.arguments}}).serialize(serializer)
    }
}

impl ToolCall {
    /// The call as the text format writes it: the name first, as the format's example does.
    pub fn text(&self) -> String {
        let name = Value::from(self.name.as_str());
        format!("{CALL_OPEN}\n{{\"name\": {name}, \"arguments\": {}}}\n{CALL_CLOSE}", self.arguments)
    }
}

/// The system prompt's tool section, as Qwen2.5's template writes it.
pub fn system_block(tools: &[Tool]) -> String {
    let listed: Vec<String> = tools.iter().map(|t| t.to_json().to_string()).collect();
    format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\n\
         For each function call, return a json object with function name and arguments within \
         {CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n{{\"name\": <function-name>, \"arguments\": \
         <args-json-object>}}\n{CALL_CLOSE}",
        listed.join("\n")
    )
}

/// The text before the first call (what may have been streamed as content, see
/// [`content_end`]) and the calls, of generated text that makes tool calls; `None` when it
/// makes none or one of its closed call blocks is not a call (then it is all content). Text
/// between and after the blocks is not kept. The last block may lack its closing tag
/// (generation stopped at end-of-sequence or the limit): it counts if it is a whole call, and
/// is dropped after other calls if it is not (cut by the limit).
pub fn read_calls(text: &str) -> Option<(&str, Vec<ToolCall>)> {
    let first = text.find(CALL_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(CALL_OPEN) {
        let body = &rest[start + CALL_OPEN.len()..];
        let Some(end) = body.find(CALL_CLOSE) else {
            match parse_call(body.trim()) {
                Some(call) => calls.push(call),
                None if calls.is_empty() => return None,
                None => {}
            }
            break;
        };
        calls.push(parse_call(body[..end].trim())?);
        rest = &body[end + CALL_CLOSE.len()..];
    }
    Some((&text[..first], calls))
}

/// `{"name": ..., "arguments": {...}}`; arguments given as a string of JSON are read too.
fn parse_call(json: &str) -> Option<ToolCall> {
    let Value::Object(mut call) = serde_json::from_str::<Value>(json).ok()? else { return None };
    let Some(Value::String(name)) = call.remove("name") else { return None };
    let arguments = match call.remove("arguments").or_else(|| call.remove("parameters")) {
        Some(Value::String(text)) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        Some(arguments) => arguments,
        None => json!({}),
    };
    Some(ToolCall { name, arguments })
}

/// Where text may be streamed up to: before a call's opening tag, or before the end of the
/// text where a tag may be starting.
pub fn content_end(text: &str) -> usize {
    if let Some(start) = text.find(CALL_OPEN) {
        return start;
    }
    let partial = (1..CALL_OPEN.len()).rev().find(|&n| text.ends_with(&CALL_OPEN[..n]));
    text.len() - partial.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_with_the_text_around_them() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}";
        let (content, calls) = read_calls(text).unwrap();
        assert_eq!(content, "Let me look.\n");
        assert_eq!(calls[0], ToolCall { name: "get_weather".into(), arguments: json!({"city": "Oslo"}) });
        // Unclosed at the end, arguments as a string of JSON.
        assert_eq!(calls[1], ToolCall { name: "f".into(), arguments: json!({"x": 1}) });
        assert_eq!(read_calls("just text"), None);
        assert_eq!(read_calls("<tool_call>\nnot json\n</tool_call>"), None);
        assert_eq!(read_calls("<tool_call>{\"arguments\": {}}</tool_call>"), None, "a call needs a name");
        let cut = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"g\", \"argu";
        assert_eq!(read_calls(cut).unwrap().1, [ToolCall { name: "f".into(), arguments: json!({}) }]);
    }

    #[test]
    fn streamed_content_stops_where_a_call_may_begin() {
        assert_eq!(content_end("Hello"), 5);
        assert_eq!(content_end("Hello <tool_"), 6);
        assert_eq!(content_end("Hi <tool_call>{"), 3);
        assert_eq!(content_end("a < b"), 5);
    }
}
