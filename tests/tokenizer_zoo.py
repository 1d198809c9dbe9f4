"""A zoo of small tokenizers in the shapes users bring, built offline in code (no download).

Each family trains a small BPE on CORPUS in a few milliseconds, adds the family's special tokens,
sets a chat template written in the shape of the family's real one, and is saved with
`save_pretrained` to a directory, so tests load it back as a user's tokenizer is loaded:

    chatml      Qwen2.5's shape: byte-level BPE, <|im_start|>/<|im_end|>, a default system prompt
                injected when the conversation has none
    llama3      Llama 3's shape: byte-level BPE, <|begin_of_text|> added by a TemplateProcessing
                post-processor AND written by the template (the double BOS), <|eot_id|> closes a turn
    mistral     Mistral's [INST] shape: SentencePiece-like BPE (Metaspace), <s> in the template, the
                system prompt folded into the first user turn, ' ' + reply|trim + '</s>' (the reply's
                first token carries the leading space), roles must alternate
    gemma       Gemma's shape: <start_of_turn>user / model ... <end_of_turn>, and a template that
                refuses a system turn with raise_exception('System role not supported')
    generation  ChatML with transformers' {% generation %}...{% endgeneration %} assistant markers
    padded      ChatML saved with `padding` and `truncation` sections in tokenizer.json (max_length 16)

`Family.end_of_turn` is the text that closes an assistant reply (what the mask covers after the
reply). CONVERSATIONS are the chats every family is checked on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CORPUS = [
    "Hello, how are you today? I am fine, thank you for asking.",
    "Sort the digits 321 and reverse 45, then add 12 and 30.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "You are a helpful assistant. Answer briefly and exactly.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea, the wind and the stars.",
    "你好，我是助手。今天天气很好，我们去公园散步吧。",
    "请把这句话翻译成英文：我喜欢学习机器学习。",
    "model assistant user system think answer question reply turn",
    "one line\ntwo lines\n\nthree lines\n",
    "user\nassistant\nsystem\nmodel\n",
] * 4

# (role, content) turns; every family is checked on each of these
CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello")],       # shorter than the padded family's truncation length
    [("user", "Hello, how are you today?"), ("assistant", "I am fine, thank you for asking.")],
    [("system", "Answer briefly and exactly."), ("user", "Sort the digits 321"), ("assistant", "123")],
    [("user", "What is the capital of France?"), ("assistant", "Paris."),
     ("user", "And reverse 45?"), ("assistant", "54")],
    [("system", "You are a helpful assistant."), ("user", "Write a short poem about the sea."),
     ("assistant", "The wind and the stars over the sea."), ("user", "Thank you"), ("assistant", "You are welcome.")],
    [("user", "你好"), ("assistant", "你好，我是助手。今天天气很好。")],
    [("user", "say model assistant"), ("assistant", "model assistant")],   # the reply repeats header words
]


def conversation(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# ----------------------------------------------------------------------------------------------
# Chat templates, each in the shape of its family's real one
# ----------------------------------------------------------------------------------------------

CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, after an optional first system message') }}"
    "{% endif %}"
    "{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# The tokenizers
# ----------------------------------------------------------------------------------------------

def byte_level_bpe(special_tokens: list[str]):
    """GPT-2 / Qwen / Llama 3 style: byte-level BPE, every byte in the alphabet (no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return core


def metaspace_bpe(special_tokens: list[str], prepend_scheme: str):
    """SentencePiece-like BPE: spaces become '▁' (Metaspace), a newline is a token of its own (as
    SentencePiece's byte fallback <0x0A> is), an unknown token for unseen characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)])
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=special_tokens,
                                                         show_progress=False))
    return core


def bos_post_processor(core, bos: str):
    """A post-processor that puts `bos` in front of every encoding with special tokens (Llama 3, Gemma)."""
    from tokenizers import processors

    bos_id = core.token_to_id(bos)
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, bos_id)])
    return core


@dataclass(frozen=True)
class Family:
    build: Callable[[], object]          # () -> tokenizers.Tokenizer
    template: str
    special: dict                        # bos_token, eos_token, pad_token, unk_token as the family sets them
    end_of_turn: str                     # the text that closes an assistant reply
    refuses_system: bool = False
    bos: str | None = None               # the token every example starts with exactly once


def _chatml():
    return byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def _padded():
    core = _chatml()
    core.enable_padding(pad_id=core.token_to_id("<|endoftext|>"), pad_token="<|endoftext|>")
    core.enable_truncation(max_length=16)
    return core


CHATML_SPECIAL = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}

FAMILIES = {
    "chatml": Family(_chatml, CHATML_DEFAULT_SYSTEM, CHATML_SPECIAL, "<|im_end|>"),
    "llama3": Family(lambda: bos_post_processor(byte_level_bpe(
                         ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"]), "<|begin_of_text|>"),
                     LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>",
                     bos="<|begin_of_text|>"),
    "mistral": Family(lambda: metaspace_bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "first"), MISTRAL,
                      {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, "</s>", bos="<s>"),
    "gemma": Family(lambda: bos_post_processor(metaspace_bpe(
                        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "never"), "<bos>"),
                    GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
                    "<end_of_turn>", refuses_system=True, bos="<bos>"),
    "generation": Family(_chatml, CHATML_GENERATION, CHATML_SPECIAL, "<|im_end|>"),
    "padded": Family(_padded, CHATML, CHATML_SPECIAL, "<|im_end|>"),
}


def save(name: str, directory: Path, template: str | None = None) -> Path:
    """Build family `name` and save it with save_pretrained to `directory` (as the Hub's files are);
    `template` replaces the family's chat template. Returns `directory`."""
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=family.build(), **family.special)
    tokenizer.chat_template = family.template if template is None else template
    tokenizer.save_pretrained(str(directory))
    return Path(directory)
