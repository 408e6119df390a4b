"""OpenAI's tool calls in chat (``tools``, ``tool_choice``, ``parallel_tool_calls``), made with
guided output, so that they work with any model and every call's arguments are JSON that the
tool's ``parameters`` schema accepts (``json_schema.schema_regex``):

- ``tool_choice: {"type": "function", "function": {"name": N}}``: the output is the arguments of
  ``N``; the message holds that one call, and ``finish_reason`` is "stop", as OpenAI's is for a
  forced function.
- ``"required"``: the output is a JSON list of calls, ``[{"name": N, "parameters": {...}}, ...]``,
  one or more (one with ``parallel_tool_calls: false``), each naming a listed tool and keeping to
  its schema; the message holds them, ``finish_reason`` "tool_calls".
- ``"none"``: the model sees the tools (they go to the chat template) and writes text.
- ``"auto"`` (OpenAI's default when tools are given): the model writes what it wants, and says
  whether it calls a tool in its family's own format, so this takes the server's parser for that
  format (``bora-serve --tool-call-parser``; without one, "auto" is refused). ``hermes``
  (``HermesCalls``): calls written as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, as Hermes 2 Pro and later and Qwen 2.5 and later write them; the text before the first
  block is the message's ``content``. ``llama3_json`` (``Llama3JsonCalls``): an output that is
  ``{"name": ..., "parameters": {...}}`` (several joined by ``;``, after an optional
  ``<|python_tag|>``), as Llama 3.1 and later write JSON-based calls. ``mistral``
  (``MistralCalls``): ``[TOOL_CALLS]``, then a JSON list of calls or ``name[ARGS]{...}`` per
  call, as Mistral's models write them; the text before it is the content. ``pythonic``
  (``PythonicCalls``): an output that is a Python list of calls, ``[name(key=value, ...), ...]``
  (in ``<|python_start|>`` and ``<|python_end|>`` for Llama 4), as Llama 3.2 and Llama 4 write
  them, read as a syntax tree and never run. These calls are not guided:
  a name or arguments the model got wrong are handed back as written, and calls that do not
  parse leave the whole output as content. Special tokens' text is kept in such outputs (a
  format's tags may be special tokens).

An output cut short by ``max_tokens`` (``finish_reason`` "length"): the calls begun are handed
back with their arguments as written, as OpenAI does (a list cut before its first call's name:
its text, as ``content``).

Streamed, a call's id and name go out once written, then its arguments piece by piece as they
are written (a list's calls one after the other); under a parser, the text goes out as content up to where calls may
begin (``hermes``, ``mistral``: the first tag, text that may be its start held back;
``llama3_json``, ``pythonic``: an output that begins with ``{``, ``[`` or the tag is held), and
the calls when the output ends.

The conversation may hold earlier calls and their results, as OpenAI's clients send them: an
assistant message with ``tool_calls`` (its ``content`` may be null) and ``tool`` messages with
``tool_call_id``. They reach the chat template as Hugging Face's templates take them, each
call's ``arguments`` as an object rather than JSON text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import uuid

from .engine import InvalidParams
from .json_schema import schema_regex
from .pattern import SCHEMA_LIMITS, Pattern

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without ``parameters``
MAX_TOOLS = 128  # OpenAI's limit
NOT_AN_OBJECT = r"(?:[^{][\s\S]*)?"  # texts that are not a JSON object


class _ListReader:
    """Reads a "required" list of calls as it is written. The guide keeps the text to the form
    ``[{"name": N, "parameters": ARGS}, ...]`` (``json.dumps``' spacing), so a call's name is
    known once its head is written and its arguments are the text from there to where their
    brackets close (counted outside strings)."""

    HEAD = re.compile(r'(?:\[|, )\{"name": "([A-Za-z0-9_-]{1,64})", "parameters": ')

    def __init__(self):
        self.text, self.at, self.calls = "", 0, []  # calls: [name, arguments written so far, closed]
        self.depth, self.quoted, self.escaped = 0, False, False

    def feed(self, piece: str) -> list[tuple[int, str | None, str]]:
        """What ``piece`` adds: ``(call index, its name where the call begins here, else None,
        arguments text added)``."""
        self.text += piece
        added = []
        while True:
            if not self.calls or self.calls[-1][2]:  # (between calls: wait for the next head)
                head = self.HEAD.match(self.text, self.at + (1 if self.calls else 0))  # (after the call's "}")
                if head is None:
                    return added
                self.calls.append([head.group(1), "", False])
                added.append((len(self.calls) - 1, head.group(1), ""))
                self.at = head.end()
            call, start = self.calls[-1], self.at
            while self.at < len(self.text) and not call[2]:
                char = self.text[self.at]
                self.at += 1
                if self.quoted:
                    self.escaped, self.quoted = not self.escaped and char == "\\", self.quoted and (self.escaped or char != '"')
                elif char == '"':
                    self.quoted = True
                elif char in "{[":
                    self.depth += 1
                elif char in "}]":
                    self.depth -= 1
                    call[2] = self.depth == 0
            if self.at > start:
                call[1] += self.text[start:self.at]
                if added and added[-1][0] == len(self.calls) - 1:
                    added[-1] = (*added[-1][:2], added[-1][2] + self.text[start:self.at])
                else:
                    added.append((len(self.calls) - 1, None, self.text[start:self.at]))
            if not call[2]:
                return added


def _deltas(added: list[tuple[int, str | None, str]]) -> list[dict]:
    """A streamed ``delta`` of tool calls for ``added`` (from ``_ListReader.feed``): a call's id
    and name where it begins, and the arguments written."""
    if not added:
        return []
    return [{"tool_calls": [{"index": k, **_call(name, arguments)} if name is not None else
                            {"index": k, "function": {"arguments": arguments}} for k, name, arguments in added]}]


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """What a request's ``tool_choice`` makes of its output: ``named``, the one function a named
    choice calls (None: "required", a list of calls); ``regex``, the pattern the output matches.
    ``reply`` reads a whole output; ``stream`` reads one as it comes."""

    named: str | None
    regex: str

    def _calls(self, text: str) -> list[dict]:
        """The output's calls in OpenAI's form (``{"id", "type": "function", "function": {"name",
        "arguments"}}``, the arguments as JSON text written, complete or not)."""
        if self.named is not None:
            return [_call(self.named, text)]
        reader = _ListReader()
        reader.feed(text)
        return [_call(name, arguments) for name, arguments, _ in reader.calls]

    def finish_reason(self, finish: str | None) -> str | None:
        """A whole list of calls ends with "tool_calls"; otherwise the output's own reason."""
        return "tool_calls" if finish == "stop" and self.named is None else finish

    def reply(self, text: str, finish: str | None) -> tuple[dict, str | None]:
        """The chat response's ``message`` for this output, and its ``finish_reason`` (a list cut
        short before its first call's name: its text as content)."""
        calls = self._calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": calls}, self.finish_reason(finish)

    def stream(self) -> _ChoiceStream:
        return _ChoiceStream(self)


class _ChoiceStream:
    """One streamed choice under a ``ToolChoice``: ``first`` its first ``delta`` (a named call's
    id and name), ``feed`` the deltas of each piece of the output (arguments as they are
    written; a list's calls as each begins), ``end`` the last ones and the finish reason."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.reader = choice, _ListReader() if choice.named is None else None
        self.first = {"role": "assistant", "content": None}
        if choice.named is not None:
            self.first["tool_calls"] = [{"index": 0, **_call(choice.named, "")}]

    def feed(self, piece: str) -> list[dict]:
        if self.reader is None:
            return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}]
        return _deltas(self.reader.feed(piece))

    def end(self, finish: str | None) -> tuple[list[dict], str | None]:
        if self.reader is not None and not self.reader.calls:  # (no call begun: the text, as content)
            return [{"content": self.reader.text}] if self.reader.text else [], finish
        return [], self.choice.finish_reason(finish)


class ParsedCalls:
    """``tool_choice: "auto"`` read by a parser of the model's own format (see the module's
    docstring): ``reply`` and ``stream`` as ``ToolChoice``'s, on free text
    (``regex`` None). A parser says which calls a whole output holds (``calls``, None: none, or
    some that do not parse: then the output is content), the content beside them (``content``),
    and how much of a text still being written can go out as content (``shown``: not what may
    yet be a call)."""

    regex = None

    def calls(self, text: str) -> list[dict] | None:
        raise NotImplementedError

    def content(self, text: str) -> str | None:
        raise NotImplementedError

    def shown(self, held: str, first: bool) -> tuple[int, bool]:
        """For a stream: how much of ``held`` (the text written after what went out as content;
        ``first``: nothing went out yet) can go out now (not what may yet be a call), and
        whether calls have begun (then the rest of the output is held to its end, unread)."""
        raise NotImplementedError

    def reply(self, text: str, finish: str | None) -> tuple[dict, str | None]:
        calls = self.calls(text)
        if calls is None:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": self.content(text), "tool_calls": calls}, "tool_calls"

    def stream(self) -> _ParsedStream:
        return _ParsedStream(self)

    @staticmethod
    def read(call, arguments: str) -> dict | None:
        """A call in OpenAI's form from a parsed ``{"name": ..., arguments: {...}}`` (None: not one)."""
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get(arguments, {}), dict)):
            return None
        return _call(call["name"], json.dumps(call.get(arguments, {}), ensure_ascii=False))


class _ParsedStream:
    """One streamed choice under a ``ParsedCalls``: the text goes out as content as far as it
    is ``shown``, the calls (or the rest of the text, where they do not parse) at the end. Each
    piece is read once: what is held back before calls begin is a few characters (the start of a
    tag), and after they begin pieces are only kept."""

    def __init__(self, parser: ParsedCalls):
        self.parser, self.sent, self.held, self.begun = parser, [], "", False
        self.rest: list[str] = []  # pieces after the calls began
        self.first = {"role": "assistant", "content": ""}

    def feed(self, piece: str) -> list[dict]:
        if self.begun:
            self.rest.append(piece)
            return []
        held = self.held + piece
        count, self.begun = self.parser.shown(held, not self.sent)
        more, self.held = held[:count], held[count:]
        if more:
            self.sent.append(more)
        return [{"content": more}] if more else []

    def end(self, finish: str | None) -> tuple[list[dict], str | None]:
        rest = self.held + "".join(self.rest)
        calls = self.parser.calls("".join(self.sent) + rest)
        if calls is None:
            return [{"content": rest}] if rest else [], finish
        return [{"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}], "tool_calls"


class _TaggedCalls(ParsedCalls):
    """Formats of text, then calls from a tag ``OPEN`` on: the text before the first tag is the
    content, and streamed text goes out up to it, less an end that may be the tag's start."""

    OPEN = ""

    def content(self, text: str) -> str | None:
        before = text[:text.find(self.OPEN)]
        return before if before.strip() else None

    def shown(self, held: str, first: bool) -> tuple[int, bool]:
        start = held.find(self.OPEN)
        if start >= 0:
            return start, True
        for k in range(min(len(self.OPEN) - 1, len(held)), 0, -1):
            if self.OPEN.startswith(held[-k:]):
                return len(held) - k, False
        return len(held), False


class HermesCalls(_TaggedCalls):
    """The ``hermes`` format (Hermes 2 Pro and later, Qwen 2.5 and later): text, then calls as
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

    OPEN = "<tool_call>"
    BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)  # (the last may be left open)

    def calls(self, text: str) -> list[dict] | None:
        start = text.find(self.OPEN)
        if start < 0:
            return None
        found = []
        for block in self.BLOCK.findall(text, start):
            try:
                found.append(self.read(json.loads(block), "arguments"))
            except json.JSONDecodeError:
                return None
        return None if None in found else found


class MistralCalls(_TaggedCalls):
    """The ``mistral`` format: text, then ``[TOOL_CALLS]`` and the calls, either a JSON list of
    ``{"name": ..., "arguments": {...}}`` (Mistral 7B v0.3, Mixtral 8x22B, Mistral Nemo) or
    ``name[ARGS]{...}``, each call after its own ``[TOOL_CALLS]`` (newer Mistral tokenizers; a
    ``[CALL_ID]...`` after the name is skipped)."""

    OPEN, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

    def calls(self, text: str) -> list[dict] | None:
        start = text.find(self.OPEN)
        if start < 0:
            return None
        body = text[start + len(self.OPEN):].strip()
        try:
            if body.startswith("["):
                listed = json.loads(body)
                found = [self.read(call, "arguments") for call in listed] if isinstance(listed, list) else [None]
            else:
                found = []
                for segment in body.split(self.OPEN):
                    name, has_args, arguments = segment.partition(self.ARGS)
                    name = name.partition(self.CALL_ID)[0].strip()
                    found.append(self.read({"name": name, "arguments": json.loads(arguments)}, "arguments")
                                 if has_args and name else None)
        except ValueError:  # (json's decode error is one)
            return None
        return None if None in found or not found else found


class _WholeOutputCalls(ParsedCalls):
    """Formats where the whole output is the calls (after an optional tag ``TAG``, before an
    optional ``END``) or else text: there is no content beside calls, and an output that begins
    with ``STARTS`` or the tag is held back until it is whole."""

    TAG, END, STARTS = "", "", ""

    def _body(self, text: str) -> str:
        body = text.strip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        return body[:-len(self.END)].rstrip() if self.END and body.endswith(self.END) else body

    def content(self, text: str) -> str | None:
        return None

    def shown(self, held: str, first: bool) -> tuple[int, bool]:
        start = held.lstrip() if first else None  # (held is only space or a tag's start while first)
        if start is None:
            return len(held), False
        if start.startswith((self.STARTS, self.TAG)):
            return 0, True
        return (0 if not start or self.TAG.startswith(start) else len(held)), False


class Llama3JsonCalls(_WholeOutputCalls):
    """The ``llama3_json`` format (Llama 3.1 and later, JSON-based tool calling): the whole output
    is the calls, ``{"name": ..., "parameters": {...}}`` (``"arguments"`` read too), several
    joined by ``;``, after an optional ``<|python_tag|>``; otherwise it is text."""

    TAG, STARTS = "<|python_tag|>", "{"

    def calls(self, text: str) -> list[dict] | None:
        body, decoder, found, at = self._body(text), json.JSONDecoder(), [], 0
        if not body.startswith("{"):
            return None
        while at < len(body):
            try:
                call, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return None
            found.append(self.read(call, "parameters" if isinstance(call, dict) and "parameters" in call else "arguments"))
            at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        return None if None in found else found


_NAMED_VALUES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


def _literal(node: ast.AST):
    """The JSON value of a Python literal's syntax tree: strings, finite numbers, ``True``,
    ``False``, ``None`` (and JSON's ``true``, ``false``, ``null``), lists, tuples (as lists) and
    dicts with string keys; ValueError for anything else (names, calls, bytes, sets...)."""
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (str, bool, int, float)):
        value = node.value
    elif isinstance(node, ast.Name) and node.id in _NAMED_VALUES:
        return _NAMED_VALUES[node.id]
    elif (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
          and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        value = -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    elif isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    elif isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and type(k.value) is str for k in node.keys):
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    else:
        raise ValueError(f"not a JSON value: {ast.dump(node):.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


class PythonicCalls(_WholeOutputCalls):
    """The ``pythonic`` format (Llama 3.2 and Llama 4): the whole output is a Python list of
    calls with keyword arguments, ``[weather(city="paris", unit="c"), now()]`` (Llama 4 wraps it
    in ``<|python_start|>`` and ``<|python_end|>``); otherwise it is text. It is read as a syntax
    tree, never run: the arguments must be literals (strings, numbers, booleans, None, lists and
    dicts; JSON's ``true``, ``false`` and ``null`` read too), and each call's arguments go out as
    a JSON object."""

    TAG, END, STARTS = "<|python_start|>", "<|python_end|>", "["

    def calls(self, text: str) -> list[dict] | None:
        body = self._body(text)
        if not body.startswith("["):
            return None
        try:
            tree = ast.parse(body, mode="eval").body
            if not (isinstance(tree, ast.List) and tree.elts):
                return None
            found = []
            for call in tree.elts:
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
                        and all(k.arg is not None for k in call.keywords)):
                    return None
                arguments = {k.arg: _literal(k.value) for k in call.keywords}
                if len(arguments) < len(call.keywords):  # (a name given twice)
                    return None
                found.append(self.read({"name": call.func.id, "arguments": arguments}, "arguments"))
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # (text, or too deeply nested to read)
            return None
        return found


TOOL_PARSERS = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls,  # for ``bora-serve --tool-call-parser``
                "mistral": MistralCalls, "pythonic": PythonicCalls}


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def check_tools(body: dict) -> dict[str, dict] | None:
    """A chat request's ``tools``, each function's name to its ``parameters`` schema (None: no
    tools). ``InvalidParams`` naming the field."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidParams("tools", f"must be a list of at most {MAX_TOOLS} tools")
    schemas = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise InvalidParams(where, 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        name = function.get("name")
        if not (isinstance(name, str) and TOOL_NAME.fullmatch(name)):
            raise InvalidParams(f"{where}.function.name", "must be 1 to 64 letters, digits, '_' or '-', "
                                                          f"got {json.dumps(name)}")
        if name in schemas:
            raise InvalidParams(f"{where}.function.name", f"{name!r} is listed twice")
        schema = function.get("parameters", NO_PARAMETERS)
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise InvalidParams(f"{where}.function.parameters", 'must be a JSON schema of "type": "object"')
        schemas[name] = schema
    return schemas


def tool_choice(body: dict, schemas: dict[str, dict] | None, parser: str | None = None) -> ToolChoice | ParsedCalls | None:
    """What a chat request's ``tool_choice`` (and ``parallel_tool_calls``) makes of its output,
    given its tools (``check_tools``) and the server's parser for "auto" (one of
    ``TOOL_PARSERS``, or None); None: free text. ``InvalidParams`` naming the field."""
    choice, parallel = body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidParams("parallel_tool_calls", f"must be true or false, got {json.dumps(parallel)}")
    if schemas is None:
        if choice not in (None, "none"):
            raise InvalidParams("tool_choice", "needs tools")
        return None
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None
    if choice == "auto":
        if parser is not None:
            return TOOL_PARSERS[parser]()
        raise InvalidParams("tool_choice", '"auto" (the default with tools) needs a parser for the model\'s own '
                                           "tool-call format, and this server was started without one "
                                           f"(bora-serve --tool-call-parser {'|'.join(TOOL_PARSERS)}): give \"required\", "
                                           '{"type": "function", "function": {"name": ...}} or "none"')
    if choice == "required":
        names = list(schemas)
    else:
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise InvalidParams("tool_choice", 'must be "none", "required" or {"type": "function", "function": '
                                               f'{{"name": ...}}}}, got {json.dumps(choice):.200}')
        if function["name"] not in schemas:
            raise InvalidParams("tool_choice", f"names {function['name']!r}, which is not in tools (they are "
                                               f"{', '.join(schemas)})")
        names = [function["name"]]
    patterns = {}
    for name in names:  # (each schema's own pattern: its $refs are its own)
        where = f"tools[{list(schemas).index(name)}].function.parameters"
        try:
            patterns[name] = schema_regex(schemas[name])
        except ValueError as err:
            raise InvalidParams(where, str(err)) from None
        if "type" not in schemas[name] and Pattern(patterns[name], SCHEMA_LIMITS).intersects(Pattern(NOT_AN_OBJECT)):
            raise InvalidParams(where, 'must describe an object (the arguments): give "type": "object"')
    if choice != "required":
        return ToolChoice(names[0], patterns[names[0]])
    call = "(?:" + "|".join(rf'\{{"name": {re.escape(json.dumps(n))}, "parameters": {p}\}}'
                            for n, p in patterns.items()) + ")"
    return ToolChoice(None, rf"\[{call}\]" if parallel is False else rf"\[{call}(?:, {call})*\]")


def history_fields(message: dict, where: str) -> dict:
    """The tool fields of an earlier message of the conversation, for the chat template: an
    assistant's ``tool_calls`` (each call's ``arguments`` read from its JSON text), a tool
    result's ``tool_call_id`` (and ``name``). ``InvalidParams`` naming the field."""
    out = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message["role"] != "assistant" or not isinstance(calls, list):
            raise InvalidParams(f"{where}.tool_calls", "must be a list, in an assistant message")
        out["tool_calls"] = []
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str)):
                raise InvalidParams(f"{where}.tool_calls[{j}]", 'must be {"id": ..., "type": "function", '
                                                               '"function": {"name": ..., "arguments": JSON text}}')
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError as err:
                raise InvalidParams(f"{where}.tool_calls[{j}].function.arguments", f"is not valid JSON: {err}") from None
            out["tool_calls"].append({"id": call.get("id"), "type": "function",
                                      "function": {"name": function["name"], "arguments": arguments}})
    for name in ("tool_call_id", "name"):
        if message.get(name) is not None:
            if not isinstance(message[name], str):
                raise InvalidParams(f"{where}.{name}", "must be a string")
            out[name] = message[name]
    if message["role"] == "tool" and "tool_call_id" not in out:
        raise InvalidParams(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
    return out
