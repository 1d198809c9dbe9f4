"""The tokenizer's chat template as ingestion uses it: renderings, and where the assistant's tokens are.

Assistant spans. Labels cover each assistant turn's content and its end-of-turn marker. The exact
method renders the conversation's prefix before and through each assistant turn and takes the
difference (correct for any template that renders a prefix as a prefix of the whole). The fast
method renders once and finds each reply as header + lead + content + end-of-turn in the rendered
text, where header (the generation prompt's), lead (what the template writes before a reply, such
as Mistral's ' ') and end-of-turn are learned from the template on probe conversations; it is used
only when it reproduces the exact method on those probes, and any conversation it cannot place falls
back to the exact method. The probes run when the renderer is built, in the parent before any work:
a template that refuses a plain user/assistant conversation or renders a probe unlike its own
prefixes is a UserError there; one that refuses the probes' system turns (Gemma's) is probed without
them. A data conversation the template refuses (raise_exception) or renders unlike its prefixes is
a DataError naming its file:line, with the template's message and the fix (data.system_turns).

Tokenizing uses a copy of the tokenizer's backend with padding and truncation off (plain_backend):
a tokenizer.json saved with those sections would pad and cut every batch its own way; tune_kd
truncates to max_seq_len itself and counts it.
"""

from __future__ import annotations

import logging

from tune_kd.config.errors import UserError
from tune_kd.data import chat_formats
from tune_kd.data.chat_formats import DataError

log = logging.getLogger(__name__)

PROBES = [  # shapes of conversation the fast span method must reproduce before it is trusted
    [("user", "probe question one"), ("assistant", "probe answer one")],
    [("system", "probe system"), ("user", "probe question one"), ("assistant", "probe answer one")],
    [("user", "probe question one"), ("assistant", "probe answer one"), ("user", "probe question two"),
     ("assistant", "probe answer two")],
    [("system", "probe system"), ("user", "q"), ("assistant", "a"), ("user", "q"), ("assistant", "a")],
]


def plain_backend(tokenizer):
    """A copy of the tokenizer's backend (a tokenizers.Tokenizer) with padding and truncation off.

    A tokenizer.json saved by `save_pretrained` may carry `padding` and `truncation` sections, which
    the backend applies to every encode_batch: pad tokens (no character offsets) and a max_length of
    its own. tune_kd truncates to data.max_seq_len itself (and counts it), so it tokenizes with this
    copy and leaves the user's tokenizer as it is."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


class SpanError(ValueError):
    """A conversation the template renders differently from its own prefixes: its assistant tokens
    cannot be located."""


def _has_system(turns: list[dict]) -> bool:
    return any(turn["role"] == "system" for turn in turns)


def _template_message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


class ChatRenderer:
    """The tokenizer's chat template, and where the assistant's tokens are in its renderings.

    Built in the parent before any work: a template that refuses a plain user/assistant conversation,
    or renders a probe conversation differently from its own prefixes, is a UserError here. A template
    that refuses the probes' system turns (Gemma's) is probed without them (`refuses_system`).
    system_turns: data.system_turns, applied to the probes as to the data (chat_formats.system_turns)."""

    def __init__(self, tokenizer, system_turns: str = "keep"):
        self.tokenizer = tokenizer
        self._backend = None
        self._template = None
        self._header = self._lead = self._footer = None
        self.refuses_system = False
        probes = self._accepted_probes(system_turns)
        self._template = self._compiled(tokenizer, probes)
        renders = [(probe, self.render(probe)) for probe in probes]
        exact = []
        for probe, text in renders:
            try:
                exact.append(self.exact_spans(probe, text))
            except SpanError:
                hint = (" (with a system turn: set data.system_turns: fold or drop)" if _has_system(probe) else "")
                raise UserError(f"the chat template renders a {len(probe)}-turn probe conversation differently from "
                                "its own prefixes, so the assistant's tokens cannot be located; use a template that "
                                f"renders each turn the same whatever follows it{hint}") from None
        try:
            self._header, self._lead, self._footer = self._learn_markers(probes[0])
            fast_ok = all(self.spans(probe, text) == spans for (probe, text), spans in zip(renders, exact))
        except ValueError:
            fast_ok = False
        if not fast_ok:
            self._header = self._lead = self._footer = None
            log.info("data: the chat template's assistant turns are located by rendering each prefix (exact, slower)")

    def _accepted_probes(self, system_turns: str) -> list[list[dict]]:
        """The probe conversations (data.system_turns applied) the template renders; those with a
        system turn are left out when it refuses them."""
        accepted = []
        for turns in PROBES:
            probe, _ = chat_formats.system_turns([{"role": r, "content": c} for r, c in turns], system_turns)
            try:
                self.render(probe)
            except Exception as exc:   # jinja2's TemplateError (raise_exception), or whatever the template trips on
                if not _has_system(probe):
                    raise UserError(f"the chat template refuses a plain user/assistant conversation "
                                    f"({_template_message(exc)!r}); use a chat template that renders user and "
                                    "assistant turns") from None
                self.refuses_system = True
                continue
            accepted.append(probe)
        return accepted

    @staticmethod
    def _compiled(tokenizer, probes: list[list[dict]]):
        """transformers' compiled Jinja template when it renders exactly like apply_chat_template, else None.
        Calling it directly skips apply_chat_template's per-call overhead (half the render time)."""
        kwargs = dict(tokenizer.special_tokens_map)
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(tokenizer.chat_template)
            for probe in probes[:2]:
                for gen in (False, True):
                    direct = template.render(messages=probe, tools=None, documents=None, add_generation_prompt=gen,
                                             **kwargs)
                    if direct != tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=gen):
                        return None
        except Exception:   # a private helper of transformers: the public path
            return None
        return lambda turns, gen: template.render(messages=turns, tools=None, documents=None,
                                                  add_generation_prompt=gen, **kwargs)

    @property
    def backend(self):
        """The tokenizer's backend without padding and truncation: its own when neither is on (checked
        at each use: transformers switches them per call), else a copy (plain_backend) made once."""
        own = self.tokenizer.backend_tokenizer
        if own.padding is None and own.truncation is None:
            return own   # no copy: a 150k-token vocabulary takes half a second to copy, per worker
        if self._backend is None:
            self._backend = plain_backend(self.tokenizer)
        return self._backend

    def render(self, turns: list[dict], generation_prompt: bool = False) -> str:
        if self._template is not None:
            return self._template(turns, generation_prompt)
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    def reply_markers(self) -> tuple[str, str]:
        """(header, end-of-turn): the text the template puts before and after an assistant reply
        (ValueError for a template that does not render a reply that way)."""
        header, lead, footer = self._learn_markers([{"role": r, "content": c} for r, c in PROBES[0]])
        return header + lead, footer

    def _learn_markers(self, probe: list[dict]) -> tuple[str, str, str]:
        """(header, lead, end-of-turn) around an assistant reply: header is what the generation
        prompt writes, lead what the template writes before the reply after it (Mistral's ' ': part
        of the reply's first token, so inside the span, as the exact method has it)."""
        prompt = self.render(probe[:1])
        with_header = self.render(probe[:1], generation_prompt=True)
        through = self.render(probe).rstrip()
        reply = probe[1]["content"]
        at = through.find(reply, len(with_header))
        if not (with_header.startswith(prompt) and through.startswith(with_header)) or at < 0:
            raise ValueError("template does not render the probe as header + reply + end-of-turn")
        return with_header[len(prompt):], through[len(with_header):at], through[at + len(reply):]

    def exact_spans(self, turns: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn's content plus its end-of-turn marker in `full`,
        by rendering the prefix before and through each assistant turn (SpanError when a prefix's
        rendering is not a prefix of `full`)."""
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self.render(turns[:i], generation_prompt=True)
            through = self.render(turns[: i + 1])
            if not (full.startswith(before) and full.startswith(through)):
                raise SpanError(f"turn {i}: the rendering of the turns before and through it is not a prefix of the whole")
            # rstrip: the newline a template puts after the end-of-turn token is formatting, not the reply
            spans.append((len(before), len(through.rstrip())))
        return spans

    def spans(self, turns: list[dict], full: str) -> list[tuple[int, int]]:
        """The assistant spans of `full` (the rendering of `turns`): fast where it can place every
        reply, in order, else exact."""
        if self._header is None:
            return self.exact_spans(turns, full)
        spans, cursor = [], 0
        for turn in turns:
            if turn["role"] != "assistant":
                continue
            needle = self._header + self._lead + turn["content"] + self._footer
            at = full.find(needle, cursor)
            if at < 0:
                return self.exact_spans(turns, full)
            cursor = at + len(needle)
            spans.append((at + len(self._header), cursor))
        return spans

    def rendered(self, turns: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """(rendering, assistant spans) of a data conversation; a DataError at `where` (file:line)
        when the template refuses it or renders it differently from its own prefixes."""
        try:
            text = self.render(turns)
            return text, self.spans(turns, text)
        except SpanError:
            raise DataError(f"{where}: the chat template renders this conversation differently from its own prefixes "
                            "(an earlier turn changes once later turns follow, as reasoning templates that strip "
                            "<think> from earlier replies do), so its assistant tokens cannot be located; split it "
                            "into one record per assistant reply, or use a template that renders each turn the same "
                            "whatever follows it") from None
        except Exception as exc:   # jinja2's TemplateError (raise_exception), or whatever the template trips on
            raise DataError(f"{where}: the tokenizer's chat template refuses this conversation "
                            f"({_template_message(exc)!r}); {self._refusal_fix(turns)}") from None

    def _refusal_fix(self, turns: list[dict]) -> str:
        """How to fix a conversation the template refuses: data.system_turns when it accepts the
        conversation without its system turns, else the record."""
        if _has_system(turns):
            try:
                self.render(chat_formats.system_turns(turns, "drop")[0])
                return ("it does not take a system turn here: set data.system_turns: fold (the system prompt goes "
                        "into the next user turn, as Gemma 3's template does) or drop")
            except Exception:   # refused without its system turns too: the record itself
                pass
        return ("fix the record so that the template accepts it (most templates want user and assistant turns "
                "alternating, user first)")


