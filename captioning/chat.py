"""The chat the model is trained on and asked in: the messages for an image, the token that ends a turn and the
label the loss skips."""

END_OF_TURN = "<|im_end|>"  # Qwen2-VL's chat template closes every turn with it; the model must learn to emit it
IGNORE_INDEX = -100  # label value the loss skips


def build_messages(image, prompt, caption=None):
    """The chat for one image: the user sends the image and the prompt; with a caption, the assistant answers."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages
