"""Chat prompts tokenized by mistral-common, with images counted but not processed here.

mistral-common's own image encoder would resize and normalise every image in the ingress; we only
need its tokens (a function of the image size), so a size-only encoder takes its place. The
pixels go to the vision pool as uint8 (see model.image_processing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest as MistralChatRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.image import ImageEncoding
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from model.image_processing import image_token_ids, token_grid
from serving.images import PreparedImage
from serving.protocol import ChatCompletionRequest, ImagePart, bad_request
from serving.tools import mistral_call_id


class SizeOnlyImageEncoder:
    """Stands in for mistral-common's ImageEncoder: the same tokens, no pixel work."""

    def __init__(self, original) -> None:
        self.config = original.image_config
        self.ids = original.special_ids

    def __call__(self, chunk: ImageChunk) -> ImageEncoding:
        width, height = chunk.image.size
        grid = token_grid(width, height, self.config.image_patch_size, self.config.max_image_size,
                          self.config.spatial_merge_size)
        tokens = image_token_ids(grid, self.ids.img, self.ids.img_break, self.ids.img_end)
        return ImageEncoding(tokens=tokens, image=np.empty((3, 0, 0), dtype=np.float32))


@dataclass
class EncodedPrompt:
    tokens: list[int]
    image_tokens: list[int]  # per image: its [IMG] + [IMG_BREAK] + [IMG_END] count

    @property
    def num_image_tokens(self) -> int:
        return sum(self.image_tokens)


class ChatTokenizer:
    def __init__(self, tokenizer_file: str | Path) -> None:
        self.mistral = MistralTokenizer.from_file(str(tokenizer_file))
        instruct = self.mistral.instruct_tokenizer
        if instruct.image_encoder is None:
            raise ValueError(f"{tokenizer_file} has no image support")
        self.image_config = instruct.image_encoder.image_config
        instruct.image_encoder = SizeOnlyImageEncoder(instruct.image_encoder)
        self.tokenizer = instruct.tokenizer
        self.tool_calls_token = self.tokenizer.get_control_token("[TOOL_CALLS]")
        # No token stands for more characters than this, so a text of more than
        # max_chars_per_token * N characters cannot fit N tokens: refused before tokenizing.
        self.max_chars_per_token = max(len(self.tokenizer.decode([i])) for i in range(self.tokenizer.n_words))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode(self, request: ChatCompletionRequest, images: list[PreparedImage]) -> EncodedPrompt:
        sizes = iter(img.size for img in images)
        messages = []
        for m in request.messages:
            if m.role in ("system", "developer"):
                messages.append(SystemMessage(content=_text_only(m.content)))
            elif m.role == "assistant":
                calls = [ToolCall(id=mistral_call_id(c.id), function=FunctionCall(name=c.function.name,
                                                                                  arguments=c.function.arguments))
                         for c in m.tool_calls or []]
                messages.append(AssistantMessage(content=_text_only(m.content) or None, tool_calls=calls or None))
            elif m.role == "tool":
                messages.append(ToolMessage(content=_text_only(m.content), tool_call_id=mistral_call_id(m.tool_call_id)))
            else:
                messages.append(UserMessage(content=_user_chunks(m.content, sizes)))
        tools = [Tool(function=Function(name=t.function.name, description=t.function.description or "",
                                        parameters=t.function.parameters)) for t in request.tools or []]
        try:
            encoded = self.mistral.encode_chat_completion(MistralChatRequest(messages=messages, tools=tools or None))
        except (ValueError, AssertionError, MistralCommonException) as exc:  # mistral-common's own validation
            raise bad_request(f"messages cannot be encoded: {str(exc)[:300]}", param="messages") from None
        patch, max_size = self.image_config.image_patch_size, self.image_config.max_image_size
        merge = self.image_config.spatial_merge_size
        per_image = [(lambda g: (g[0] + 1) * g[1])(token_grid(*img.size, patch, max_size, merge)) for img in images]
        return EncodedPrompt(list(encoded.tokens), per_image)


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in all messages and tool definitions (what tokenization will walk through)."""
    total = 0
    for m in request.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(p.text) for p in m.content if not isinstance(p, ImagePart))
        total += sum(len(c.function.name) + len(c.function.arguments) for c in m.tool_calls or [])
    for t in request.tools or []:
        total += len(t.function.name) + len(t.function.description or "") + len(json.dumps(t.function.parameters))
    return total


def _text_only(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def _user_chunks(content, sizes) -> list:
    if isinstance(content, str):
        return [TextChunk(text=content)]
    chunks = []
    for part in content:
        if isinstance(part, ImagePart):
            # a 1-bit stand-in of the right size: the size-only encoder reads nothing else
            chunks.append(ImageChunk(image=Image.new("1", next(sizes))))
        else:
            chunks.append(TextChunk(text=part.text))
    return chunks
