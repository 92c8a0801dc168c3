//! Tool calling in chat completions: `tools` and `tool_choice` read into the tools the prompt
//! offers and, for `required` or a named function, a grammar the output must follow; generated
//! text read back into `tool_calls` (see `preprocess::tools` for the format), whole or streamed.

use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::ApiError;
use super::request::{RequestConstraint, parse_param};
use crate::engine::{Constraint, compact_schema};
use crate::preprocess::tools::{self, CALL_CLOSE, CALL_OPEN, Tool, ToolCall};

/// OpenAI's limit.
const MAX_TOOLS: usize = 128;

/// What a request's tools ask of the model.
#[derive(Debug, Default)]
pub struct RequestTools {
    /// Offered in the prompt; none with `tool_choice: "none"`.
    pub offered: Vec<Tool>,
    /// Must the output be calls (`required` or a named function), and of which tools.
    pub forced: Option<Forced>,
}

#[derive(Debug)]
pub struct Forced {
    tools: Vec<Tool>,
    /// More than one call may follow (`required` with `parallel_tool_calls`).
    many: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTool {
    #[serde(rename = "type")]
    kind: ToolKind,
    function: WireFunction,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ToolKind {
    Function,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireChoice {
    Mode(Mode),
    Named { function: Named },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

impl RequestTools {
    /// Read `tools`, `tool_choice` and `parallel_tool_calls`; each error names its parameter.
    pub fn read(tools: Vec<Value>, choice: Option<Value>, parallel: Option<bool>) -> Result<Self, ApiError> {
        if tools.len() > MAX_TOOLS {
            return Err(ApiError::invalid_param("tools", format!("at most {MAX_TOOLS} tools")));
        }
        let mut offered: Vec<Tool> = Vec::with_capacity(tools.len());
        for (i, tool) in tools.into_iter().enumerate() {
            let at = format!("tools[{i}]");
            let WireTool { kind: ToolKind::Function, function } = parse_param(tool, &at)?;
            let valid = (1..=64).contains(&function.name.len())
                && function.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid || offered.iter().any(|t| t.name == function.name) {
                let param = format!("{at}.function.name");
                let why = "must be 1 to 64 letters, digits, '_' or '-', and unique";
                return Err(ApiError::invalid_param(&param, format!("{param} {why}")));
            }
            let parameters =
                function.parameters.map_or_else(|| json!({"type": "object", "properties": {}}), Value::Object);
            offered.push(Tool { name: function.name, description: function.description, parameters });
        }
        let choice = match choice {
            None => WireChoice::Mode(Mode::Auto),
            Some(choice) => parse_param::<WireChoice>(choice, "tool_choice")?,
        };
        if offered.is_empty() && !matches!(choice, WireChoice::Mode(Mode::None | Mode::Auto)) {
            return Err(ApiError::invalid_param("tool_choice", "tool_choice needs tools"));
        }
        let forced = match choice {
            WireChoice::Mode(Mode::None) => return Ok(Self::default()),
            WireChoice::Mode(Mode::Auto) => None,
            WireChoice::Mode(Mode::Required) => Some(Forced { tools: offered.clone(), many: parallel.unwrap_or(true) }),
            WireChoice::Named { function } => {
                let Some(tool) = offered.iter().find(|t| t.name == function.name) else {
                    let message = format!("tool_choice names {:?}, which is not among the tools", function.name);
                    return Err(ApiError::invalid_param("tool_choice", message));
                };
                Some(Forced { tools: vec![tool.clone()], many: false })
            }
        };
        Ok(Self { offered, forced })
    }

    /// Whether the output is read for calls.
    pub fn reads_calls(&self) -> bool {
        !self.offered.is_empty()
    }

    /// The grammar a forced choice puts on the output.
    pub fn constraint(&self) -> Option<RequestConstraint> {
        let forced = self.forced.as_ref()?;
        Some(RequestConstraint { constraint: Constraint::Lark(forced.grammar()), param: "tools" })
    }
}

impl Forced {
    /// Calls in the text format, one or more, each of one of the tools with arguments that
    /// follow its schema (JSON written compactly, as constrained JSON always is here).
    fn grammar(&self) -> String {
        let lark = |text: &str| Value::from(text).to_string();
        let mut grammar = String::new();
        grammar += if self.many { "start: call (\"\\n\" call)*\n" } else { "start: call\n" };
        let alternatives: Vec<String> = (0..self.tools.len()).map(|i| format!("fn{i}")).collect();
        let open = lark(&format!("{CALL_OPEN}\n"));
        let close = lark(&format!("\n{CALL_CLOSE}"));
        grammar += &format!("call: {open} ({}) {close}\n", alternatives.join(" | "));
        for (i, tool) in self.tools.iter().enumerate() {
            let head = lark(&format!("{{\"name\": {}, \"arguments\": ", Value::from(tool.name.as_str())));
            grammar += &format!("fn{i}: {head} args{i} \"}}\"\n");
            grammar += &format!("args{i}: %json {}\n", compact_schema(tool.parameters.clone()));
        }
        grammar
    }
}

/// `message.tool_calls` / `delta.tool_calls` entries for calls read from a sample's text.
pub fn calls_json(calls: &[ToolCall], with_index: bool) -> Value {
    let call = |(index, call): (usize, &ToolCall)| {
        let arguments = match &call.arguments {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let mut entry = json!({
            "id": format!("call_{:024x}", rand::random::<u128>() >> 32),
            "type": "function",
            "function": {"name": call.name, "arguments": arguments},
        });
        if with_index {
            entry["index"] = index.into();
        }
        entry
    };
    calls.iter().enumerate().map(call).collect()
}

/// A whole sample's message and finish reason: its calls when it made some.
pub fn message<'a>(text: &str, finish_reason: &'a str, reads_calls: bool) -> (Value, &'a str) {
    match reads_calls.then(|| tools::read_calls(text)).flatten() {
        Some((content, calls)) => {
            let content = content.trim();
            let content = (!content.is_empty()).then_some(content);
            let message = json!({"role": "assistant", "content": content, "tool_calls": calls_json(&calls, false)});
            (message, calls_finish(finish_reason))
        }
        None => (json!({"role": "assistant", "content": text}), finish_reason),
    }
}

/// A sample that made calls finished for them, unless the token limit cut it.
pub fn calls_finish(finish_reason: &str) -> &str {
    if finish_reason == "length" { finish_reason } else { "tool_calls" }
}

/// One streamed sample's text while calls may come: content is sent up to where a call may
/// begin, the rest is held until the sample ends.
#[derive(Debug, Default)]
pub struct HeldText {
    text: String,
    sent: usize,
    /// A call began at `sent`: nothing more is sent before the end.
    calling: bool,
}

impl HeldText {
    /// Take a token's text; the content that can be sent now. Only the text not sent yet is
    /// looked at (at most a tag's length besides the new text), so a token costs its own length.
    pub fn push(&mut self, text: &str) -> &str {
        self.text.push_str(text);
        if self.calling {
            return "";
        }
        let start = self.sent;
        let unsent = &self.text[start..];
        let end = start + tools::content_end(unsent);
        self.calling = self.text[end..].starts_with(tools::CALL_OPEN);
        self.sent = end;
        &self.text[start..end]
    }

    /// At the sample's end: the content still to send, and the calls if it made some.
    pub fn finish(&self) -> (&str, Option<Vec<ToolCall>>) {
        match tools::read_calls(&self.text) {
            Some((content, calls)) => (&content[self.sent.min(content.len())..], Some(calls)),
            None => (&self.text[self.sent..], None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tool_choice_is_read_and_bad_ones_name_their_parameter() {
        let read = |choice: Value| RequestTools::read(vec![weather()], Some(choice), None);
        assert!(read(json!("auto")).unwrap().forced.is_none());
        assert!(!read(json!("none")).unwrap().reads_calls(), "none offers no tools");
        assert!(read(json!("required")).unwrap().forced.is_some_and(|f| f.many));
        let named = read(json!({"type": "function", "function": {"name": "get_weather"}})).unwrap();
        assert!(named.forced.is_some_and(|f| !f.many && f.tools.len() == 1));
        let param = |r: Result<RequestTools, ApiError>| r.unwrap_err().param;
        assert_eq!(
            param(read(json!({"type": "function", "function": {"name": "nope"}}))).as_deref(),
            Some("tool_choice")
        );
        assert_eq!(param(read(json!("sometimes"))).as_deref(), Some("tool_choice"));
        assert_eq!(
            param(RequestTools::read(Vec::new(), Some(json!("required")), None)).as_deref(),
            Some("tool_choice")
        );
        let bad_name = json!({"type": "function", "function": {"name": "two words"}});
        assert_eq!(param(RequestTools::read(vec![bad_name], None, None)).as_deref(), Some("tools[0].function.name"));
        let twice = RequestTools::read(vec![weather(), weather()], None, None);
        assert_eq!(param(twice).as_deref(), Some("tools[1].function.name"));
        let not_function = json!({"type": "retrieval", "function": {"name": "f"}});
        assert_eq!(param(RequestTools::read(vec![not_function], None, None)).as_deref(), Some("tools[0].type"));
    }

    #[test]
    fn a_forced_choice_is_a_grammar_of_calls() {
        let tools = RequestTools::read(vec![weather()], Some(json!("required")), Some(false)).unwrap();
        let Some(RequestConstraint { constraint: Constraint::Lark(grammar), .. }) = tools.constraint() else {
            panic!("no grammar")
        };
        assert!(grammar.starts_with("start: call\ncall: \"<tool_call>\\n\" (fn0) \"\\n</tool_call>\"\n"), "{grammar}");
        assert!(grammar.contains(r#"fn0: "{\"name\": \"get_weather\", \"arguments\": " args0 "}""#), "{grammar}");
        assert!(grammar.contains("args0: %json {\"type\":\"object\""), "{grammar}");
    }

    #[test]
    fn streamed_text_holds_back_calls_and_gives_the_same_message() {
        let text = "Sure. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let mut held = HeldText::default();
        let mut sent = String::new();
        for piece in [
            "Sure",
            ". <tool",
            "_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
        ] {
            sent += held.push(piece);
        }
        let (rest, calls) = held.finish();
        sent += rest;
        assert_eq!(sent, "Sure. ");
        let calls = calls.unwrap();
        assert_eq!(calls[0].arguments, json!({"city": "Oslo"}));
        let (message, finish) = message(text, "stop", true);
        assert_eq!(finish, "tool_calls");
        assert_eq!(message["content"], "Sure.");
        assert_eq!(message["tool_calls"][0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
        assert!(message["tool_calls"][0]["id"].as_str().is_some_and(|id| id.starts_with("call_")));

        let mut plain = HeldText::default();
        assert_eq!(plain.push("a <b"), "a <b");
        assert_eq!(plain.finish(), ("", None));
        assert_eq!(super::message("a <b", "length", true).1, "length");
    }
}
