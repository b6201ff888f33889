"""The browser chat of ``web_demo.py``: a gradio page over the continuous-batching engine.

Every browser tab is a session with its own conversation (a :class:`Conversation` in a
``gr.State``); all sessions share one model through one :class:`qwen.serving.engine.Engine`,
so the answers of several tabs are decoded in the same batch and stream at the same time.

The model is always given the raw text of the conversation (ChatML, built by
:func:`qwen.qwen_generation_utils.make_context`): the page renders Markdown, code and
LaTeX in the browser (``gr.Chatbot``), and nothing rendered is read back.

    engine = load_engine(checkpoint)            # qwen.serving.app.load_engine
    demo = create_demo(engine, generation_config, model_name="Qwen-7B-Chat")
    launch(demo, engine, server_name="127.0.0.1", server_port=8000)

Everything the page needs is served by the demo itself: no analytics
(``GRADIO_ANALYTICS_ENABLED`` defaults to ``False`` here), no web fonts, no remote assets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from qwen.qwen_generation_utils import make_context
from qwen.serving.engine import (
    ContextLengthError,
    Engine,
    EngineStoppedError,
    QueueFullError,
    SamplingParams,
    Update,
)

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
# Rendered in the page (KaTeX, in the browser): $$...$$ and \[...\] as display math,
# $...$ and \(...\) inline, the delimiters Qwen models write.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
# The page's fonts: the system's own, so that the browser fetches nothing from the internet
# (gradio's default theme loads Google Fonts).
SANS_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace")

STOPPED_NOTE = "*(stopped)*"
CUT_NOTE = "*(cut off: the max new tokens setting or the context length was reached)*"


class ChatError(Exception):
    """A problem to show on the page (an empty message, a prompt too long, a failed answer...)."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class ChatSettings:
    """The generation settings of the page. ``temperature`` 0 is greedy decoding, ``top_k`` 0
    turns top-k off, ``seed`` None draws a fresh random seed for every answer."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, config, max_model_len: int) -> ChatSettings:
        """The checkpoint's settings (``do_sample`` false: greedy, temperature 0)."""
        do_sample = bool(getattr(config, "do_sample", True))
        temperature = getattr(config, "temperature", None)
        max_new = getattr(config, "max_new_tokens", None) or 512
        return cls(
            temperature=float(temperature if temperature is not None else 1.0) if do_sample else 0.0,
            top_p=float(getattr(config, "top_p", None) or 1.0),
            top_k=int(getattr(config, "top_k", None) or 0),
            max_new_tokens=max(1, min(int(max_new), max_model_len - 1)),
            repetition_penalty=float(getattr(config, "repetition_penalty", None) or 1.0),
        )

    @classmethod
    def from_inputs(cls, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed) -> ChatSettings:
        """Settings from the page's inputs (numbers as gradio sends them); raises ChatError."""

        def number(name, value, kind):
            try:
                converted = kind(value)
            except (TypeError, ValueError):
                raise ChatError(f"{name} must be a number, got {value!r}") from None
            if kind is int and converted != float(value):
                raise ChatError(f"{name} must be a whole number, got {value!r}")
            return converted

        settings = cls(
            temperature=number("temperature", temperature, float),
            top_p=number("top_p", top_p, float),
            top_k=number("top_k", top_k, int),
            max_new_tokens=number("max new tokens", max_new_tokens, int),
            repetition_penalty=number("repetition penalty", repetition_penalty, float),
            seed=None if seed is None or str(seed).strip() == "" else number("seed", seed, int),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ChatError naming the first setting out of range."""
        if not 0 <= self.temperature <= 100:
            raise ChatError(f"temperature must be between 0 and 100 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p must be greater than 0 and at most 1, got {self.top_p}")
        if self.top_k < 0:
            raise ChatError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ChatError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not self.repetition_penalty > 0:
            raise ChatError(f"repetition penalty must be greater than 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ChatError(f"the seed must be empty (random) or an integer from 0 to 2**32-1, got {self.seed}")


# --------------------------------------------------------------------------- a conversation


@dataclasses.dataclass
class Turn:
    """One exchange. ``status``: ``streaming``, ``done``, ``stopped`` (by the user) or ``cut``
    (max new tokens or the context reached). ``previous`` keeps the answer a regeneration
    replaces, put back if the new one fails."""

    query: str
    answer: str = ""
    status: str = "streaming"
    previous: tuple[str, str] | None = None


class Conversation:
    """The state of one browser session: its turns and the answer being generated."""

    def __init__(self):
        self.turns: list[Turn] = []
        self.ready: Turn | None = None  # accepted, not yet submitted to the engine
        self.streaming: Turn | None = None  # submitted, its answer streaming
        self.handle = None  # the engine request of ``streaming``
        self.stop_requested = False

    @property
    def busy(self) -> bool:
        return self.ready is not None or self.streaming is not None

    def history(self, before: Turn | None = None) -> list[tuple[str, str]]:
        """The finished turns (those before ``before``) as the model sees them: the raw
        query and the raw answer (a stopped answer as far as it got)."""
        turns = self.turns[: self.turns.index(before)] if before is not None else self.turns
        return [(t.query, t.answer) for t in turns if t.status != "streaming"]

    def messages(self) -> list[dict]:
        """The turns in gr.Chatbot's messages format (the text it renders as Markdown).

        Each text goes in a ``{"type": "text"}`` part: gr.Chatbot passes a plain string
        content through ``inspect.cleandoc``, which would dedent and strip what the model
        wrote (an indented code block would lose its indentation)."""
        out = []
        for turn in self.turns:
            out.append({"role": "user", "content": [_text(turn.query)]})
            if turn.status == "streaming" and not turn.answer:
                continue  # the page shows its pending indicator
            out.append({"role": "assistant", "content": [_text(shown_answer(turn))]})
        return out


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def shown_answer(turn: Turn) -> str:
    """A turn's answer as the page shows it: the raw text, plus a note when it was cut short."""
    note = {"stopped": STOPPED_NOTE, "cut": CUT_NOTE}.get(turn.status)
    if note is None:
        return turn.answer
    text = turn.answer
    if text.count("```") % 2:  # an unfinished code block: close it so the note stays outside
        text += "\n```"
    return f"{text}\n\n{note}" if text else note


# --------------------------------------------------------------------------- the engine side


class WebChat:
    """Builds prompts and streams answers through ``engine`` for the page's sessions."""

    def __init__(self, engine: Engine, generation_config, system: str = DEFAULT_SYSTEM):
        self.engine = engine
        self.tokenizer = tok = engine.tokenizer
        self.generation_config = generation_config
        self.system = system
        self.defaults = ChatSettings.from_generation_config(generation_config, engine.max_model_len)
        # <|im_end|> ends an answer; <|im_start|> and <|endoftext|> would start a new turn or text.
        self.stop_token_ids = list(dict.fromkeys([tok.im_end_id, tok.im_start_id, tok.eod_id]))
        self.max_window_size = getattr(generation_config, "max_window_size", None)

    def prompt(
        self, query: str, history: list[tuple[str, str]], system: str, settings: ChatSettings
    ) -> tuple[list[int], int]:
        """``(prompt token ids, max new tokens)``: the ChatML prompt of ``query`` after
        ``history`` and how much of the answer fits in the context. Like ``model.chat()``,
        the oldest turns are left out beyond the generation config's ``max_window_size``
        (and beyond what leaves room for ``max_new_tokens``); a query that does not fit on
        its own raises ChatError."""
        limit = self.engine.max_model_len
        window = max(1, limit - settings.max_new_tokens)
        if self.max_window_size:
            window = min(window, int(self.max_window_size))
        _, ids = make_context(self.tokenizer, query, history=history, system=system, max_window_size=window)
        room = limit - len(ids)
        if room < 1:
            raise ChatError(
                f"The message is too long: with the system prompt it makes a prompt of {len(ids):,} tokens, "
                f"and this model's context holds {limit:,} tokens. Shorten it."
            )
        return ids, min(settings.max_new_tokens, room)

    def params(self, settings: ChatSettings, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
            seed=settings.seed,
            stop_token_ids=self.stop_token_ids,
            strip=True,  # as model.chat() returns it
        )

    async def stream(self, conv: Conversation, ids: list[int], params: SamplingParams) -> AsyncIterator[Update]:
        """Submit one request and yield its updates; several updates that arrived together
        are merged into one. The request is cancelled if the consumer stops early (a
        closed tab) and when ``conv.stop_requested`` is set."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Update] = asyncio.Queue()

        def deliver(update: Update) -> None:  # called in the engine's thread
            loop.call_soon_threadsafe(queue.put_nowait, update)

        try:
            handle = self.engine.submit(ids, params, deliver)
        except QueueFullError:
            raise ChatError("The model is busy with other chats: try again in a moment.") from None
        except EngineStoppedError:
            raise ChatError("The model is not running (the demo is shutting down).") from None
        except ContextLengthError as error:
            raise ChatError(str(error)) from None
        conv.handle = handle
        if conv.stop_requested:
            self.engine.cancel(handle)
        finished = False
        try:
            while not finished:
                update = await queue.get()
                while not update.finished and not queue.empty():
                    update = _merge(update, queue.get_nowait())
                finished = update.finished
                yield update
        finally:
            if not finished:
                self.engine.cancel(handle)
            conv.handle = None

    def cancel(self, conv: Conversation) -> None:
        """Stop the answer ``conv`` is generating, if any."""
        conv.stop_requested = True
        handle = conv.handle
        if handle is not None:
            self.engine.cancel(handle)


def _merge(first: Update, second: Update) -> Update:
    return dataclasses.replace(second, text=first.text + second.text, token_ids=first.token_ids + second.token_ids)


# --------------------------------------------------------------------------- the page


class ChatPage:
    """The page's event handlers (gradio calls them with the session's Conversation). All
    are coroutines: they run one at a time on the server's event loop, never in threads
    beside each other, so a session's Conversation needs no lock."""

    def __init__(self, chat: WebChat):
        self.chat = chat

    async def accept(self, conv: Conversation, message: str):
        """Take the typed message: it joins the chat, the box is emptied (a problem leaves
        the message in the box and shows a warning)."""
        import gradio as gr

        if conv.busy:
            gr.Warning("An answer is still being written: wait for it, or press Stop.")
            return gr.update(), gr.update(), *_unchanged()
        if not (message or "").strip():
            gr.Warning("Type a message first.")
            return gr.update(), gr.update(), *_unchanged()
        conv.stop_requested = False
        turn = Turn(query=message)
        conv.turns.append(turn)
        conv.ready = turn
        return conv.messages(), "", *_buttons(busy=True)

    async def regenerate(self, conv: Conversation):
        """Prepare to answer the last message again (its answer is replaced)."""
        import gradio as gr

        if conv.busy:
            gr.Warning("An answer is still being written: wait for it, or press Stop.")
            return gr.update(), *_unchanged()
        if not conv.turns:
            gr.Warning("There is no answer to regenerate yet.")
            return gr.update(), *_unchanged()
        conv.stop_requested = False
        turn = conv.turns[-1]
        turn.previous = (turn.answer, turn.status)
        turn.answer, turn.status = "", "streaming"
        conv.ready = turn
        return conv.messages(), *_buttons(busy=True)

    async def respond(self, conv: Conversation, system: str, *settings: Any):
        """Stream the answer to the accepted message into the chat (a generator of
        ``(chat messages, message box, send, regenerate, stop)`` updates; the buttons are
        enabled again at the end)."""
        import gradio as gr

        turn, conv.ready = conv.ready, None
        if turn is None:  # nothing was accepted (an empty message, a busy session)
            yield gr.update(), gr.update(), *_unchanged()
            return
        conv.streaming = turn
        restore_box = gr.update()
        try:
            parsed = ChatSettings.from_inputs(*settings)
            if turn in conv.turns:  # else cleared before it started
                ids, max_tokens = self.chat.prompt(turn.query, conv.history(before=turn), system or "", parsed)
                updates = self.chat.stream(conv, ids, self.chat.params(parsed, max_tokens))
                async with contextlib.aclosing(updates):
                    async for update in updates:
                        if update.error:
                            raise ChatError(f"Generation failed: {update.error}")
                        turn.answer += update.text
                        if update.finished:
                            turn.status = {"cancelled": "stopped", "length": "cut"}.get(update.finish_reason, "done")
                            turn.previous = None
                        elif turn in conv.turns:
                            yield conv.messages(), gr.update(), *_unchanged()
        except ChatError as error:
            logger.info("chat error shown to the user: %s", error)
            gr.Warning(str(error))
            restore_box = self._undo(conv, turn)
        except Exception as error:  # a bug: say so on the page, keep the traceback in the log
            logger.exception("answering failed")
            gr.Warning(f"Something went wrong: {type(error).__name__}: {error}")
            restore_box = self._undo(conv, turn)
        finally:
            conv.streaming = None
            if turn.status == "streaming" and turn.previous is None and turn.answer:
                turn.status = "stopped"  # the page went away mid-answer
        yield conv.messages(), restore_box, *_buttons(busy=conv.busy)

    @staticmethod
    def _undo(conv: Conversation, turn: Turn):
        """Take back a turn that got no answer: a regenerated one gets its old answer back,
        a new one leaves the chat and its message goes back into the box."""
        import gradio as gr

        if turn not in conv.turns:
            return gr.update()
        if turn.previous is not None:
            turn.answer, turn.status = turn.previous
            turn.previous = None
            return gr.update()
        conv.turns.remove(turn)
        return turn.query

    async def stop(self, conv: Conversation) -> None:
        self.chat.cancel(conv)

    async def clear(self, conv: Conversation):
        if conv.busy:
            self.chat.cancel(conv)
        conv.turns.clear()
        return []

    def close(self, conv: Conversation) -> None:
        """A session ended (tab closed): free its batch slot."""
        if conv is not None and conv.busy:
            self.chat.cancel(conv)


def _buttons(busy: bool) -> tuple:
    """Updates of the send, regenerate and stop buttons: stop only while an answer streams."""
    import gradio as gr

    return gr.update(interactive=not busy), gr.update(interactive=not busy), gr.update(interactive=busy)


def _unchanged() -> tuple:
    import gradio as gr

    return gr.update(), gr.update(), gr.update()


def _theme():
    import gradio as gr

    return gr.themes.Default(font=list(SANS_FONTS), font_mono=list(MONO_FONTS))


CSS = """
#qwen-chat .message-wrap { font-size: 15px; }
footer { display: none !important; }
"""


def create_demo(
    engine: Engine,
    generation_config,
    *,
    model_name: str = "Qwen",
    system: str = DEFAULT_SYSTEM,
):
    """The chat page (a ``gr.Blocks``, its queue configured) for ``engine``, with defaults
    from ``generation_config`` (the checkpoint's). Start the engine before serving it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    chat = WebChat(engine, generation_config, system=system)
    page = ChatPage(chat)
    d = chat.defaults
    limit = engine.max_model_len

    with gr.Blocks(title=f"{model_name} - Qwen chat", analytics_enabled=False) as demo:
        gr.Markdown(
            f"### Qwen chat · `{model_name}`\n"
            "Enter sends, Shift+Enter starts a new line. Answers render Markdown, code and LaTeX."
        )

        # A plain function, not the bound method: gradio deep-copies the page's config (this
        # callback included) for every page load, and copying ChatPage would copy the model.
        def close_session(conv: Conversation) -> None:
            page.close(conv)

        conv = gr.State(Conversation, delete_callback=close_session)
        chatbot = gr.Chatbot(
            label="Chat",
            elem_id="qwen-chat",
            height=520,
            buttons=["copy", "copy_all"],
            latex_delimiters=LATEX_DELIMITERS,
            feedback_options=None,
        )
        with gr.Row():
            message = gr.Textbox(
                show_label=False,
                placeholder="Type a message (Enter sends, Shift+Enter starts a new line)",
                lines=1,
                max_lines=12,
                scale=8,
                elem_id="qwen-message",
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="qwen-send")
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="qwen-stop")
            regenerate = gr.Button("Regenerate", elem_id="qwen-regenerate")
            clear = gr.Button("Clear history", elem_id="qwen-clear")
        system_box = gr.Textbox(label="System prompt", value=system, lines=1, max_lines=6, elem_id="qwen-system")
        with gr.Accordion("Generation settings", open=False, elem_id="qwen-settings"):
            with gr.Row():
                temperature = gr.Slider(
                    0,
                    max(2.0, d.temperature),
                    value=d.temperature,
                    step=0.01,
                    label="temperature",
                    info="0: greedy (always the most likely token)",
                    elem_id="qwen-temperature",
                )
                top_p = gr.Slider(
                    0.01,
                    1,
                    value=d.top_p,
                    step=0.01,
                    label="top_p",
                    info="nucleus sampling; 1: off",
                    elem_id="qwen-top-p",
                )
                top_k = gr.Slider(
                    0, max(100, d.top_k), value=d.top_k, step=1, label="top_k", info="0: off", elem_id="qwen-top-k"
                )
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1,
                    limit,
                    value=d.max_new_tokens,
                    step=1,
                    label="max new tokens",
                    info=f"the context holds {limit:,} tokens",
                    elem_id="qwen-max-new-tokens",
                )
                repetition_penalty = gr.Slider(
                    0.5,
                    max(2.0, d.repetition_penalty),
                    value=d.repetition_penalty,
                    step=0.01,
                    label="repetition penalty",
                    info="1: off",
                    elem_id="qwen-repetition-penalty",
                )
                seed = gr.Number(
                    value=None,
                    precision=0,
                    label="seed",
                    info="empty: a new random seed for each answer",
                    elem_id="qwen-seed",
                )
            reset = gr.Button("Restore the checkpoint's settings", size="sm", elem_id="qwen-reset")
        settings = [temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed]

        # Every event may run beside any other (the engine batches the answers): no gradio
        # concurrency limit; the engine's own queue says when it is full.
        free = {"concurrency_limit": None}
        buttons = [send, regenerate, stop]
        answer = {
            "fn": page.respond,
            "inputs": [conv, system_box, *settings],
            "outputs": [chatbot, message, *buttons],
            "show_progress": "hidden",
            **free,
        }
        for trigger in (message.submit, send.click):
            trigger(page.accept, [conv, message], [chatbot, message, *buttons], show_progress="hidden", **free).then(
                **answer
            )
        regenerate.click(page.regenerate, [conv], [chatbot, *buttons], show_progress="hidden", **free).then(**answer)
        stop.click(page.stop, [conv], None, show_progress="hidden", **free)
        clear.click(page.clear, [conv], [chatbot], show_progress="hidden", **free)
        chatbot.clear(page.clear, [conv], [chatbot], show_progress="hidden", **free)  # its own trash button
        reset.click(
            lambda: (d.temperature, d.top_p, d.top_k, d.max_new_tokens, d.repetition_penalty, None),
            None,
            settings,
            show_progress="hidden",
            **free,
        )
    demo.queue(default_concurrency_limit=None)
    demo.web_chat = chat  # for callers and tests: the backend behind the page
    return demo


def launch(demo, *, server_name: str = "127.0.0.1", server_port: int | None = None, **kwargs):
    """Serve ``demo`` (``gr.Blocks.launch`` with the page's theme and offline settings)."""
    kwargs.setdefault("footer_links", [])
    return demo.launch(
        server_name=server_name,
        server_port=server_port,
        theme=_theme(),
        css=CSS,
        **kwargs,
    )
