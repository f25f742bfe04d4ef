"""The chat the model is trained on and asked in: the messages for an image, the chat template without thinking by
default, the token that ends a turn and the label the loss skips."""
from captioning.errors import PipelineError

END_OF_TURN = "<|im_end|>"  # Qwen2-VL's chat template closes every turn with it; the model must learn to emit it
IGNORE_INDEX = -100  # label value the loss skips


def build_messages(image, prompt, caption=None):
    """The chat for one image: the user sends the image and the prompt; with a caption, the assistant answers."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


# Qwen3.5's template opens a thinking block after the generation prompt unless enable_thinking=False is passed: a
# caption model must answer at once, whoever calls the template (llama-mtmd-cli, vllm serve and Ollama pass nothing)
THINKS_UNLESS_TOLD_NOT_TO = "{%- if enable_thinking is defined and enable_thinking is false %}"
THINKS_ONLY_WHEN_ASKED = "{%- if not (enable_thinking is defined and enable_thinking) %}"
TEMPLATE_ARGUMENTS = {"enable_thinking": False}  # for a template not yet rewritten (vLLM's base model + adapter)
# llama-mtmd-cli passes enable_thinking=true to every Jinja template, and has no setting to change it
NEVER_THINKS = "{%- if true %}"


def without_thinking_by_default(processor):
    """The processor with a chat template that thinks only when enable_thinking=True is passed, so that training,
    every saved folder and every client that calls the template without arguments put the caption right after the
    prompt's empty thinking block; templates without thinking are left as they are."""
    template = processor.chat_template
    if not template or "enable_thinking" not in template:
        return processor
    if THINKS_UNLESS_TOLD_NOT_TO not in template and THINKS_ONLY_WHEN_ASKED not in template:
        raise PipelineError("the model's chat template has a thinking mode that this project does not know how to "
                            "switch off (no `enable_thinking is defined and enable_thinking is false` test): use the "
                            "template the model was released with")
    processor.chat_template = template.replace(THINKS_UNLESS_TOLD_NOT_TO, THINKS_ONLY_WHEN_ASKED)
    if getattr(processor.tokenizer, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def never_thinking(template):
    """A chat template rewritten by without_thinking_by_default, made to answer after the empty thinking block even
    when enable_thinking=true is passed (for llama.cpp, which always passes it); other templates as they are."""
    return template.replace(THINKS_ONLY_WHEN_ASKED, NEVER_THINKS)
