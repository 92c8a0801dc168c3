//! Chat templates rendered as transformers' `apply_chat_template` renders them.
//!
//! transformers compiles templates with Jinja2's `trim_blocks` and `lstrip_blocks`, the
//! loop-controls extension and Python string methods; minijinja with pycompat does the same.

use minijinja::value::Kwargs;
use minijinja::{Environment, Value, context};
use serde::Serialize;

use super::PreprocessError;
use super::tools::{self, RESPONSE_CLOSE, RESPONSE_OPEN, Tool, ToolCall};
use std::borrow::Cow;

/// One part of a message's content, serialized the way HF processors expect:
/// `{"type": "text", "text": ...}` or `{"type": "image"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Text { text: String },
    Image,
}

/// A chat message; content is always a list of parts (HF VLM templates index into it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
    /// An assistant message's calls of tools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message's answer to this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A user message with the images first, then the text, as the HF examples build it.
    pub fn user(images: usize, text: &str) -> Self {
        let mut content = vec![ContentPart::Image; images];
        if !text.is_empty() {
            content.push(ContentPart::Text { text: text.to_string() });
        }
        Self { role: "user".into(), content, ..Self::default() }
    }

    /// A message of text alone.
    pub fn text(role: &str, text: String) -> Self {
        Self { role: role.into(), content: vec![ContentPart::Text { text }], ..Self::default() }
    }

    pub fn image_count(&self) -> usize {
        self.content.iter().filter(|p| matches!(p, ContentPart::Image)).count()
    }
}

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Value,
    /// The template reads `tools`; else they are written into the messages (see [`tools`]).
    takes_tools: bool,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compile `source`; `tokenizer_config` supplies `bos_token`, `eos_token` and friends.
    pub fn new(source: &str, tokenizer_config: &serde_json::Value) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        let special_tokens = Value::from_serialize(special_tokens(tokenizer_config));
        Ok(Self { env, special_tokens, takes_tools: source.contains("tools") })
    }

    /// Render `messages` with `add_generation_prompt`, as the prompt for generation, offering
    /// `tools`.
    pub fn render(&self, messages: &[ChatMessage], tools: &[Tool]) -> Result<String, PreprocessError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| PreprocessError::Template(e.to_string()))?;
        let rendered = if self.takes_tools {
            let tools: Option<Vec<serde_json::Value>> =
                (!tools.is_empty()).then(|| tools.iter().map(Tool::to_json).collect());
            template.render(context! { messages, tools, add_generation_prompt => true, ..self.special_tokens.clone() })
        } else {
            let messages = tools_in_text(messages, tools);
            template.render(context! { messages, add_generation_prompt => true, ..self.special_tokens.clone() })
        };
        rendered.map_err(|e| PreprocessError::Template(e.to_string()))
    }
}

/// `messages` with the tools, calls and results written as text (see [`tools`]), for a
/// template that does not know tools; borrowed when there are none.
fn tools_in_text<'a>(messages: &'a [ChatMessage], tools: &[Tool]) -> Cow<'a, [ChatMessage]> {
    let mentions_tools = |m: &ChatMessage| !m.tool_calls.is_empty() || m.role == "tool";
    if tools.is_empty() && !messages.iter().any(mentions_tools) {
        return Cow::Borrowed(messages);
    }
    let mut out: Vec<ChatMessage> = messages.iter().map(message_in_text).collect();
    if !tools.is_empty() {
        let block = tools::system_block(tools);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content.push(ContentPart::Text { text: format!("\n\n{block}") })
            }
            _ => out.insert(0, ChatMessage::text("system", block)),
        }
    }
    Cow::Owned(out)
}

fn message_in_text(message: &ChatMessage) -> ChatMessage {
    let mut out = ChatMessage { tool_calls: Vec::new(), tool_call_id: None, ..message.clone() };
    if message.role == "tool" {
        out.role = "user".into();
        out.content.insert(0, ContentPart::Text { text: format!("{RESPONSE_OPEN}\n") });
        out.content.push(ContentPart::Text { text: format!("\n{RESPONSE_CLOSE}") });
    }
    let calls: Vec<String> = message.tool_calls.iter().map(ToolCall::text).collect();
    if !calls.is_empty() {
        let blank = out.content.iter().all(|p| matches!(p, ContentPart::Text { text } if text.trim().is_empty()));
        let lead = if blank { "" } else { "\n" };
        out.content.push(ContentPart::Text { text: format!("{lead}{}", calls.join("\n")) });
    }
    out
}

/// transformers' `tojson`: Python's `json.dumps` (", " and ": " between items, `indent`
/// honoured, nothing escaped for HTML), not Jinja2's or minijinja's, so that tools and call
/// arguments render as they do there.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let indentation = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&indentation);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonSeparators)),
    };
    written.map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

/// `json.dumps`' default separators.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Special tokens from `tokenizer_config.json`, which stores them as strings or as
/// `{"content": ...}` objects.
fn special_tokens(tokenizer_config: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let token = &tokenizer_config[key];
        let text = token.as_str().or_else(|| token["content"].as_str());
        if let Some(text) = text {
            map.insert(key.to_string(), text.into());
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SMOLVLM: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    #[test]
    fn renders_smolvlm_template_like_transformers() {
        let t = ChatTemplate::new(SMOLVLM, &serde_json::json!({})).unwrap();
        let one = t.render(&[ChatMessage::user(1, "What is this?")], &[]).unwrap();
        assert_eq!(one, "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:");
        let text = t.render(&[ChatMessage::user(0, "Hi")], &[]).unwrap();
        assert_eq!(text, "<|im_start|>User: Hi<end_of_utterance>\nAssistant:");
    }

    #[test]
    fn special_tokens_and_python_methods_are_available() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}{% endfor %}";
        let cfg = serde_json::json!({"bos_token": {"content": "<s>"}});
        let t = ChatTemplate::new(src, &cfg).unwrap();
        assert_eq!(t.render(&[ChatMessage::user(0, "x")], &[]).unwrap(), "<s>USER");
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=1) }}", &serde_json::json!({})).unwrap();
        let env = &t.env;
        let rendered = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(context! { x => serde_json::json!({"a": [1, "<b>"], "é": {}}) })
            .unwrap();
        assert_eq!(rendered, "{\"a\": [1, \"<b>\"], \"é\": {}}|{\n \"a\": [\n  1,\n  \"<b>\"\n ],\n \"é\": {}\n}");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", &serde_json::json!({})).unwrap();
        let err = t.render(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn a_template_that_knows_tools_gets_them_and_the_calls_as_transformers_passes_them() {
        let src = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}";
        let t = ChatTemplate::new(src, &serde_json::json!({})).unwrap();
        let tool = Tool { name: "f".into(), description: None, parameters: serde_json::json!({"type": "object"}) };
        let call = ToolCall { name: "f".into(), arguments: serde_json::json!({"x": 1}) };
        let messages = [
            ChatMessage { tool_calls: vec![call], ..ChatMessage::text("assistant", String::new()) },
            ChatMessage { tool_call_id: Some("c1".into()), ..ChatMessage::text("tool", "2".into()) },
        ];
        assert_eq!(t.render(&messages, &[tool]).unwrap(), "[f]assistant:f({\"x\": 1});tool:#c1;");
    }

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    #[test]
    fn tools_calls_and_results_become_text_for_a_template_without_tools() {
        let messages = vec![
            ChatMessage::text("user", "Weather in Oslo?".into()),
            ChatMessage {
                tool_calls: vec![ToolCall { name: "get_weather".into(), arguments: json!({"city": "Oslo"}) }],
                ..ChatMessage::text("assistant", String::new())
            },
            ChatMessage { tool_call_id: Some("call_1".into()), ..ChatMessage::text("tool", "12 C".into()) },
        ];
        assert!(matches!(tools_in_text(&messages[..1], &[]), Cow::Borrowed(_)));
        let out = tools_in_text(&messages, &[weather()]);
        assert_eq!(out[0].role, "system");
        let text = |m: &ChatMessage| {
            m.content
                .iter()
                .map(|p| if let ContentPart::Text { text } = p { text.as_str() } else { "" })
                .collect::<String>()
        };
        let system = text(&out[0]);
        assert!(system.starts_with("# Tools\n"), "{system}");
        assert!(system.contains(r#""name":"get_weather""#) && system.contains(r#""description":"Weather in a city""#));
        assert!(
            system
                .ends_with("<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
        );
        assert_eq!(
            text(&out[2]),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}\n</tool_call>"
        );
        assert_eq!((out[3].role.as_str(), text(&out[3]).as_str()), ("user", "<tool_response>\n12 C\n</tool_response>"));
        assert!(out.iter().all(|m| m.tool_calls.is_empty()));
    }
}
