"""OpenAI chat messages -> a Qwen ChatML prompt, and Qwen's ReAct function calling.

The Qwen-1 chat models were trained to call tools through a ReAct-style prompt: the
last user message is prefixed with a description of every tool and a fixed format
(Question / Thought / Action / Action Input / Observation / Final Answer). The model
answers with ``Thought: ...``, then either ``Action: <tool>`` + ``Action Input:
<JSON>`` (and generation stops at ``Observation:``, where the tool's result goes) or
``Final Answer: ...``. This module

* turns an OpenAI message list (``system``/``developer``, ``user``, ``assistant``
  with ``tool_calls`` or a legacy ``function_call``, ``tool``/``function`` results)
  into the ``(system, history, query)`` that :func:`qwen.qwen_generation_utils.make_context`
  takes, plus an optional *prefill*: assistant text that the model continues;
* builds the ReAct instruction from OpenAI ``tools`` (or legacy ``functions``);
* parses the model's ReAct text back into a tool call with JSON arguments, or plain
  content when the text is not a well-formed call.

How messages map (see docs/openai_api.md):

* All system (and ``developer``) messages, wherever they are, are joined with a blank
  line into the one ChatML system prompt; without any, the default
  ``"You are a helpful assistant."`` is used.
* Consecutive user messages are joined with a blank line into one user turn;
  consecutive assistant messages with a newline into one assistant turn.
* An assistant message with tool calls becomes ``Thought: <content>\\nAction: <name>\\n
  Action Input: <arguments>``; with tools in the request, a plain assistant message
  becomes ``Thought: I now know the final answer\\nFinal Answer: <content>`` (the
  trained format). A tool (or function) message appends ``\\nObservation: <result>``
  to the assistant turn before it.
* If the list ends with an assistant or tool message, that assistant turn is left open
  and the model continues it (after a tool result, from a new ``Thought:``); the reply
  holds only the continuation.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from qwen.qwen_generation_utils import DEFAULT_SYSTEM

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters} "
    "Format the arguments as a JSON object."
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

OBSERVATION = "Observation:"
# Where the model's turn ends when it calls a tool: the result is the caller's to give.
REACT_STOP = OBSERVATION
FINAL_ANSWER_PREFIX = "Thought: I now know the final answer\nFinal Answer: "

SYSTEM_ROLES = ("system", "developer")
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class PromptError(ValueError):
    """A message list or tool list that cannot be turned into a prompt; ``param`` names
    the offending request field (``messages.2.role``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class ChatPrompt:
    """What :func:`make_context` needs, plus assistant text for the model to continue."""

    system: str
    history: list[tuple[str, str]]
    query: str
    prefill: str = ""
    functions: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParsedReply:
    """A reply split into content and function calls: ``name``/``arguments`` are the
    first call, ``calls`` all of them (``(name, arguments)``, several where the model
    wrote several actions before its first ``Observation:``)."""

    content: str | None
    name: str | None = None
    arguments: str | None = None  # a JSON object, as a string
    calls: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.name is not None and not self.calls:
            self.calls = [(self.name, self.arguments or "{}")]

    @property
    def is_call(self) -> bool:
        return self.name is not None


# --------------------------------------------------------------------------- tools


def select_functions(
    tools: Sequence[dict] | None = None,
    tool_choice: Any = None,
    functions: Sequence[dict] | None = None,
    function_call: Any = None,
) -> tuple[list[dict], str | None]:
    """The function definitions to describe in the prompt, and the API style.

    Returns ``(functions, style)``: ``style`` is "tools" (reply with ``tool_calls``),
    "functions" (legacy ``function_call``) or None (no function calling). A choice of
    "none" gives no functions; a named tool or function restricts the list to it;
    "auto" and "required" describe all of them (the model cannot be forced to call).
    """
    if tools and functions:
        raise PromptError("give either tools or the legacy functions, not both", "functions")
    if tools:
        defs = []
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise PromptError(f"tools[{index}]: only tools of type 'function' are supported", f"tools.{index}.type")
            defs.append(_check_function(tool.get("function"), f"tools.{index}.function"))
        return _choose(defs, tool_choice, "tool_choice", nested=True), "tools"
    if functions:
        defs = [_check_function(f, f"functions.{i}") for i, f in enumerate(functions)]
        return _choose(defs, function_call, "function_call", nested=False), "functions"
    if tool_choice not in (None, "none", "auto") or function_call not in (None, "none", "auto"):
        param = "tool_choice" if tool_choice not in (None, "none", "auto") else "function_call"
        value = tool_choice if param == "tool_choice" else function_call
        raise PromptError(f"{param} is {value!r} but the request has no tools (or functions)", param)
    return [], None


def _check_function(definition: Any, param: str) -> dict:
    """Check one definition: OpenAI's (``name``, ``description``, ``parameters`` as a
    JSON Schema) or the original Qwen server's (``name_for_model``, ``name_for_human``,
    ``description_for_model``, ``parameters`` as a list of ``{name, description,
    required, schema}``); either may have both sets of keys. Returns it with ``name``
    set (to ``name_for_model`` where only that is given)."""
    if not isinstance(definition, dict):
        raise PromptError(f"{param} must be an object with a 'name'", param)
    for key in ("name", "description", "name_for_model", "name_for_human", "description_for_model"):
        value = definition.get(key)
        if value is not None and not isinstance(value, str):
            raise PromptError(f"{param}.{key} must be a string", f"{param}.{key}")
    name = definition.get("name") or definition.get("name_for_model")
    if not isinstance(name, str) or not name.strip():
        raise PromptError(f"{param}.name must be a non-empty string (or give name_for_model)", f"{param}.name")
    parameters = definition.get("parameters")
    if isinstance(parameters, list):
        for k, item in enumerate(parameters):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                raise PromptError(
                    f"{param}.parameters[{k}] must be an object with a 'name' (Qwen-style parameter list)",
                    f"{param}.parameters.{k}",
                )
            if item.get("schema") is not None and not isinstance(item["schema"], dict):
                raise PromptError(f"{param}.parameters[{k}].schema must be an object", f"{param}.parameters.{k}.schema")
    elif parameters is not None and not isinstance(parameters, dict):
        raise PromptError(
            f"{param}.parameters must be a JSON Schema object or a list of parameters", f"{param}.parameters"
        )
    return {**definition, "name": name}


def arguments_schema(definition: Mapping[str, Any]) -> dict | None:
    """The JSON Schema of a function's arguments: ``parameters`` itself, or an object
    schema built from a Qwen-style parameter list; None where nothing is declared."""
    parameters = definition.get("parameters")
    if isinstance(parameters, dict):
        return parameters or None
    if not parameters:
        return None
    properties, required = {}, []
    for item in parameters:
        schema = dict(item.get("schema") or {})
        if item.get("description") and "description" not in schema:
            schema["description"] = item["description"]
        properties[item["name"]] = schema
        if item.get("required"):
            required.append(item["name"])
    return {"type": "object", "properties": properties, "required": required}


def _choose(defs: list[dict], choice: Any, param: str, nested: bool) -> list[dict]:
    if choice is None or choice in ("auto", "required"):
        return defs
    if choice == "none":
        return []
    name = None
    if isinstance(choice, dict):
        named = choice.get("function") if nested else choice
        name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise PromptError(f"{param} must be 'none', 'auto', 'required' or name a function", param)
    chosen = [d for d in defs if name in (d["name"], d.get("name_for_model"))]
    if not chosen:
        raise PromptError(f"{param} names {name!r}, which is not among the given functions", param)
    return chosen


def react_instruction(functions: Sequence[dict]) -> str:
    """The ReAct instruction describing ``functions`` (OpenAI function definitions;
    the original keys ``name_for_model``, ``name_for_human`` and
    ``description_for_model`` are honoured too, and ``parameters`` is shown as given,
    a JSON Schema or the original server's list of parameters)."""
    descriptions, names = [], []
    for definition in functions:
        name = definition.get("name_for_model") or definition["name"]
        human = definition.get("name_for_human") or definition["name"]
        description = definition.get("description_for_model") or definition.get("description") or ""
        parameters = definition.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        descriptions.append(
            TOOL_DESC.format(
                name_for_model=name,
                name_for_human=human,
                description_for_model=description,
                parameters=json.dumps(parameters, ensure_ascii=False),
            )
        )
        names.append(name)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descriptions), tools_name_text=", ".join(names))


def function_names(functions: Sequence[dict]) -> dict[str, str]:
    """The name the model is told for each function (``name_for_model`` if given, else
    ``name``) -> the name the client declared (``name``), which replies carry."""
    return {d.get("name_for_model") or d["name"]: d["name"] for d in functions}


# --------------------------------------------------------------------------- messages


def content_text(content: Any, param: str) -> str:
    """A message's content as text: a string, None (empty) or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "text":
                raise PromptError(f"{param}[{index}].text must be a string", f"{param}.{index}.text")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PromptError(
                    f"{param}[{index}]: content parts of type {kind!r} are not supported (text only)",
                    f"{param}.{index}",
                )
        return "\n".join(texts)
    raise PromptError(f"{param} must be a string or a list of text parts", param)


def _calls_of(message: dict, index: int) -> list[tuple[str, str]]:
    calls = []
    for k, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise PromptError(
                f"messages[{index}].tool_calls[{k}] needs a function with a name", f"messages.{index}.tool_calls.{k}"
            )
        calls.append((function["name"], _arguments_text(function.get("arguments"))))
    legacy = message.get("function_call")
    if legacy:
        if not isinstance(legacy, dict) or not isinstance(legacy.get("name"), str):
            raise PromptError(f"messages[{index}].function_call needs a name", f"messages.{index}.function_call")
        calls.append((legacy["name"], _arguments_text(legacy.get("arguments"))))
    return calls


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _action(name: str, arguments: str) -> str:
    return f"Action: {name}\nAction Input: {arguments}"


def build_chat_prompt(
    messages: Sequence[dict], functions: Sequence[dict] = (), default_system: str = DEFAULT_SYSTEM
) -> ChatPrompt:
    """Turn OpenAI ``messages`` (dicts) into a :class:`ChatPrompt`; ``functions`` are the
    definitions to describe (from :func:`select_functions`). Raises :class:`PromptError`."""
    if not messages:
        raise PromptError("messages must contain at least one message", "messages")
    react = bool(functions)
    system_parts: list[str] = []
    turns: list[list[Any]] = []  # [user text, assistant text or None]
    pending: list[tuple[str, str]] = []  # tool calls of the open assistant turn not yet answered
    ends_with_observation = False
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{index}] must be an object", f"messages.{index}")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise PromptError(
                f"messages[{index}].role: unknown role {role!r}; expected one of {', '.join(KNOWN_ROLES)}",
                f"messages.{index}.role",
            )
        text = content_text(message.get("content"), f"messages.{index}.content")
        ends_with_observation = False
        if role in SYSTEM_ROLES:
            system_parts.append(text)
        elif role == "user":
            pending = []
            if turns and turns[-1][1] is None:
                turns[-1][0] += "\n\n" + text
            else:
                turns.append([text, None])
        elif role == "assistant":
            if not turns:
                raise PromptError(
                    f"messages[{index}]: an assistant message needs a user message before it", f"messages.{index}.role"
                )
            calls = _calls_of(message, index)
            if calls:
                thought = text.strip()
                if thought.startswith("Thought:"):
                    thought = thought[len("Thought:") :].strip()
                rendered = f"Thought: {thought}\n{_action(*calls[0])}"
                pending = calls[1:]
            elif react:
                rendered = FINAL_ANSWER_PREFIX + text
            else:
                rendered = text
            turns[-1][1] = rendered if turns[-1][1] is None else turns[-1][1] + "\n" + rendered
        else:  # tool / function: a result for the open assistant turn
            if not turns or turns[-1][1] is None:
                raise PromptError(
                    f"messages[{index}]: a {role} message must follow an assistant message that calls a tool",
                    f"messages.{index}.role",
                )
            turns[-1][1] += f"\n{OBSERVATION} {text}"
            if pending:
                turns[-1][1] += "\n" + _action(*pending.pop(0))
            else:
                ends_with_observation = True
    if not turns:
        raise PromptError("messages must contain at least one user message", "messages")

    system = "\n\n".join(system_parts) if system_parts else default_system
    query, prefill = turns[-1]
    if react:
        query = f"{react_instruction(functions)}\n\nQuestion: {query}"
    if prefill is not None and ends_with_observation:
        prefill += "\nThought:"
    history = [(user, assistant) for user, assistant in turns[:-1]]
    return ChatPrompt(system, history, query, prefill or "", list(functions))


# --------------------------------------------------------------------------- replies


def _last_markers(prefill: str) -> dict[str, int]:
    found = {m: _last_marker(prefill, m) for m in ("Thought:", "Final Answer:", "Action:", OBSERVATION)}
    return {m: at for m, at in found.items() if at >= 0}


def in_react_turn(prefill: str) -> bool:
    """Whether a prefilled assistant turn (:attr:`ChatPrompt.prefill`) is a ReAct turn
    (thoughts, actions, observations) that the model continues."""
    return bool(_last_markers(prefill))


def continues_final_answer(prefill: str) -> bool:
    """Whether a prefilled assistant turn ends inside a final answer: its last ReAct
    marker is ``Final Answer:``, so what the model adds is answer text, not a ReAct
    reply to parse."""
    last = _last_markers(prefill)
    return bool(last) and max(last, key=last.get) == "Final Answer:"


def _last_marker(text: str, marker: str) -> int:
    found, at = -1, _marker(text, marker)
    while at >= 0:
        found, at = at, _marker(text, marker, at + 1)
    return found


def _marker(text: str, marker: str, start: int = 0) -> int:
    """Index of ``marker`` at the start of a line of ``text`` (from ``start``), or -1."""
    match = re.compile(r"(?:^|\n)" + re.escape(marker)).search(text, start)
    if match is None:
        return -1
    return match.end() - len(marker)


def _json_object(text: str) -> str | None:
    """``text`` as a JSON object string (a fenced ```json block is accepted), or None."""
    candidates = [text]
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        candidates.append(fenced.group(1))
    for candidate in candidates:
        try:
            value = json.loads(candidate, strict=False)  # control characters in strings: re-escaped below
        except ValueError:
            continue
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
    return None


def _strip_thought(text: str) -> str:
    text = text.strip()
    if text.startswith("Thought:"):
        text = text[len("Thought:") :].strip()
    return text


_CALL_END_MARKERS = ("Action:", "Thought:", OBSERVATION, "Final Answer:")


def parse_react(text: str, names: Collection[str] | None = None) -> ParsedReply:
    """Parse a ReAct reply.

    A call is an ``Action:`` line followed by an ``Action Input:`` line (before any
    ``Final Answer:``), naming one of ``names`` (if given) with a JSON object as input;
    the thought before the first call becomes the content. Several actions in a row
    (each with its input, thoughts between them allowed) are several calls. With
    ``names`` a mapping (from :func:`function_names`) each call carries the name it maps
    to. Otherwise the text after ``Final Answer:`` is the content, or, without one, the
    whole text. A malformed call (unknown tool, input that is not a JSON object) makes
    the whole reply plain content: the whole text.
    """
    action = _marker(text, "Action:")
    final = _marker(text, "Final Answer:")
    if action >= 0 and (final < 0 or action < final):
        end = final if final >= 0 else len(text)
        observation = _marker(text[:end], OBSERVATION, action)
        if observation >= 0:
            end = observation
        calls = []
        at = action
        while at >= 0:
            call = _parse_action(text, at, end, names)
            if call is None:
                return ParsedReply(text.strip())
            calls.append(call[:2])
            at = _marker(text[:end], "Action:", call[2] - 1)  # from the newline before it
        name, arguments = calls[0]
        return ParsedReply(_strip_thought(text[:action]) or None, name, arguments, calls)
    if final >= 0:
        return ParsedReply(text[final + len("Final Answer:") :].strip())
    return ParsedReply(text.strip())


def _parse_action(text: str, action: int, end: int, names) -> tuple[str, str, int] | None:
    """The call whose ``Action:`` marker is at ``action``: (name, arguments, where its
    input ends), or None when malformed."""
    args_at = _marker(text[:end], "Action Input:", action)
    if args_at < 0:
        return None
    start = args_at + len("Action Input:")
    stop = min([at for at in (_marker(text[:end], m, start) for m in _CALL_END_MARKERS) if at >= 0], default=end)
    name = text[action + len("Action:") : args_at].strip()
    arguments = _json_object(text[start:stop].strip())
    if not name or "\n" in name or arguments is None or (names is not None and name not in names):
        return None
    if isinstance(names, Mapping):
        name = names[name]
    return name, arguments, stop


class ReactStream:
    """Streams a ReAct reply: text is held back until it is known to be a final answer
    (``Final Answer:`` came before any ``Action:``), whose text is then passed on as it
    grows; everything else is decided by :func:`parse_react` at the end. The content
    deltas joined equal the parsed reply's content."""

    def __init__(self, names: Collection[str] | None = None):
        self.names = names
        self.text = ""
        self.shown = ""

    def feed(self, delta: str) -> str:
        """Add generated text; return content that can be sent now."""
        self.text += delta
        final = _marker(self.text, "Final Answer:")
        if final < 0:
            return ""
        action = _marker(self.text, "Action:")
        if 0 <= action < final:
            return ""
        visible = self.text[final + len("Final Answer:") :].strip()
        if not visible.startswith(self.shown):
            return ""
        out = visible[len(self.shown) :]
        self.shown = visible
        return out

    def finish(self) -> tuple[str, ParsedReply]:
        """The content still to send and the parsed reply."""
        reply = parse_react(self.text, self.names)
        if reply.is_call or reply.content is None:
            return (reply.content or "") if not self.shown else "", reply
        rest = reply.content[len(self.shown) :] if reply.content.startswith(self.shown) else ""
        return rest, reply
