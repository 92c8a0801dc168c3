//! Chat templates rendered as transformers' `apply_chat_template` renders them.
//!
//! transformers compiles templates with Jinja2's `trim_blocks` and `lstrip_blocks`, the
//! loop-controls extension and Python string methods; minijinja with pycompat does the same.

use minijinja::{Environment, Value, context};
use serde::Serialize;

use super::PreprocessError;

/// One part of a message's content, serialized the way HF processors expect:
/// `{"type": "text", "text": ...}` or `{"type": "image"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ContentPart {
    Text { text: String },
    Image,
}

/// A chat message; content is always a list of parts (HF VLM templates index into it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    /// A user message with the images first, then the text, as the HF examples build it.
    pub fn user(images: usize, text: &str) -> Self {
        let mut content = vec![ContentPart::Image; images];
        if !text.is_empty() {
            content.push(ContentPart::Text { text: text.to_string() });
        }
        Self { role: "user".into(), content }
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
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compile `source`; `tokenizer_config` supplies `bos_token`, `eos_token` and friends.
    pub fn new(source: &str, tokenizer_config: &serde_json::Value) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| PreprocessError::Template(e.to_string()))?;
        Ok(Self { env, special_tokens: Value::from_serialize(special_tokens(tokenizer_config)) })
    }

    /// Render `messages` with `add_generation_prompt`, as the prompt for generation.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, PreprocessError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| PreprocessError::Template(e.to_string()))?;
        template
            .render(context! { messages => messages, add_generation_prompt => true, ..self.special_tokens.clone() })
            .map_err(|e| PreprocessError::Template(e.to_string()))
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
    use super::*;

    const SMOLVLM: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    #[test]
    fn renders_smolvlm_template_like_transformers() {
        let t = ChatTemplate::new(SMOLVLM, &serde_json::json!({})).unwrap();
        let one = t.render(&[ChatMessage::user(1, "What is this?")]).unwrap();
        assert_eq!(one, "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:");
        let text = t.render(&[ChatMessage::user(0, "Hi")]).unwrap();
        assert_eq!(text, "<|im_start|>User: Hi<end_of_utterance>\nAssistant:");
    }

    #[test]
    fn special_tokens_and_python_methods_are_available() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}{% endfor %}";
        let cfg = serde_json::json!({"bos_token": {"content": "<s>"}});
        let t = ChatTemplate::new(src, &cfg).unwrap();
        assert_eq!(t.render(&[ChatMessage::user(0, "x")]).unwrap(), "<s>USER");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", &serde_json::json!({})).unwrap();
        let err = t.render(&[]).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
