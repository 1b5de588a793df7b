"""Chat templates (Jinja, from model files) rendered in a sandboxed worker process with a
time limit, an output-size limit and a memory limit.

A template comes with the weights, so it is untrusted input. Jinja's sandbox blocks attribute
tricks, but not work: nested `range` loops run for hours and `'a' * 10**9` allocates a GB,
and a thread cannot be stopped. So templates are rendered the way transformers renders them
(`utils/chat_template_utils.py`: an `ImmutableSandboxedEnvironment` with trim_blocks /
lstrip_blocks, loopcontrols, a non-HTML-escaping `tojson`, `raise_exception`, `strftime_now`)
but in one long-lived child process (`python -I`, stdlib + jinja2 only, RLIMIT_AS capped)
that is killed and restarted when a render runs past `RENDER_TIMEOUT_S`. Requests and replies
are JSON lines over pipes (no pickle); a render costs one round trip (~0.1 ms) on top of
Jinja itself. Errors are one line: template errors keep their jinja2 exception class, limits
raise `ChatTemplateError` (a `jinja2.TemplateError` and a `ValueError`).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

import jinja2

RENDER_TIMEOUT_S = 5.0          # a real template renders in well under a millisecond
MAX_OUTPUT_CHARS = 1 << 22      # 4M characters: far beyond any model's context
WORKER_MEMORY_BYTES = 1 << 29   # address-space cap of the worker (it idles at ~26 MB)
_START_TIMEOUT_S = 60.0


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
  """A chat template broke a limit (time, output size, memory) or could not be rendered."""


def render(template: str, *, source: str = "<memory>", timeout_s: float | None = None,
           max_chars: int | None = None, **context) -> str:
  """`template` rendered with `context` (messages, add_generation_prompt, bos_token, ...).

  `source` (the model file or directory) is named in errors. Raises a jinja2 TemplateError
  subclass (the template's own `raise_exception`, SecurityError, syntax errors) or
  ChatTemplateError when a limit is hit.
  """
  timeout_s = RENDER_TIMEOUT_S if timeout_s is None else timeout_s
  max_chars = MAX_OUTPUT_CHARS if max_chars is None else max_chars
  try:
    request = json.dumps({"template": template, "context": context, "max_chars": max_chars},
                         ensure_ascii=False).encode("utf-8") + b"\n"
  except (TypeError, ValueError) as e:
    raise ChatTemplateError(f"chat template of {source}: the messages/arguments must be "
                            f"JSON-serializable ({e})") from None
  reply = _WORKER.call(request, timeout_s, source)
  if "text" in reply:
    return reply["text"]
  name, message = reply.get("error", "TemplateError"), " ".join(reply.get("message", "").split())
  cls = getattr(jinja2.exceptions, name, None)
  if name == "TemplateSyntaxError":  # its own str() spans two lines
    raise ChatTemplateError(f"chat template of {source}: syntax error on line "
                            f"{reply.get('lineno')}: {message}")
  if name != "ChatTemplateError" and isinstance(cls, type) and issubclass(
      cls, jinja2.exceptions.TemplateError):
    raise cls(message)
  raise ChatTemplateError(f"chat template of {source}: {message}")


class _Worker:
  """The child process; restarted after a timeout, a crash, or in a forked child."""

  def __init__(self):
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._pid = None  # the process that started _proc (a forked child must not share it)
    self._buf = bytearray()

  def _start(self):
    boot = ("import sys, importlib.util as u; sys.path[:0] = sys.argv[1:3]; "
            "s = u.spec_from_file_location('_chat_template_worker', sys.argv[3]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m._serve(int(sys.argv[4]))")
    # -I: no PYTHONPATH, user site or script dir on sys.path; only jinja2 (+ markupsafe).
    import markupsafe
    paths = [os.path.dirname(os.path.dirname(m.__file__)) for m in (jinja2, markupsafe)]
    try:
      self._proc = subprocess.Popen(
          [sys.executable, "-I", "-c", boot, *paths, os.path.abspath(__file__),
           str(WORKER_MEMORY_BYTES)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as e:
      raise ChatTemplateError(f"cannot start the chat template worker ({sys.executable!r}: "
                              f"{e.strerror or e})") from None
    self._pid, self._buf = os.getpid(), bytearray()
    try:
      ready = self._read(time.monotonic() + _START_TIMEOUT_S)
    except (EOFError, TimeoutError, ValueError):
      ready = None
    if ready != {"ready": True}:
      self.stop()
      raise ChatTemplateError(f"chat template worker ({sys.executable} -I) did not start")

  def stop(self):
    if self._proc is not None and self._pid == os.getpid():
      self._proc.kill()
      self._proc.wait()
    self._proc = None

  def _read(self, deadline: float):
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buf:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise TimeoutError
      chunk = os.read(fd, 1 << 20)
      if not chunk:
        raise EOFError
      self._buf += chunk
    line, _, rest = bytes(self._buf).partition(b"\n")
    self._buf = bytearray(rest)
    return json.loads(line)

  def call(self, request: bytes, timeout_s: float, source: str) -> dict:
    with self._lock:
      if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
        self._start()
      deadline = time.monotonic() + timeout_s
      try:
        self._proc.stdin.write(request)
        self._proc.stdin.flush()
        return self._read(deadline)
      except TimeoutError:
        self.stop()
        raise ChatTemplateError(f"chat template of {source}: rendering ran past the "
                                f"{timeout_s:g} s limit (runaway loops?); stopped") from None
      except (EOFError, OSError, ValueError):
        code = self._proc.poll() if self._proc else None
        self.stop()
        raise ChatTemplateError(f"chat template of {source}: the render worker died (exit "
                                f"code {code}; memory limit {WORKER_MEMORY_BYTES >> 20} MiB?)"
                                ) from None


_WORKER = _Worker()
atexit.register(_WORKER.stop)


# ----- the worker side (runs in the child; stdlib + jinja2 only) ---------------------------------

def _environment():
  import datetime

  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; HF's does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env


def _render_one(env, compiled: dict, request: dict) -> dict:
  template = request["template"]
  if template not in compiled:
    if len(compiled) >= 16:
      compiled.clear()
    compiled[template] = env.from_string(template)
  max_chars, size, parts = request["max_chars"], 0, []
  for chunk in compiled[template].generate(**request["context"]):
    size += len(chunk)
    if size > max_chars:
      return {"error": "ChatTemplateError",
              "message": f"the rendered text exceeds the {max_chars}-character limit"}
    parts.append(chunk)
  return {"text": "".join(parts)}


def _serve(memory_bytes: int) -> None:
  import resource

  try:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  except (ValueError, OSError):  # e.g. a lower hard limit already: the time/output caps remain
    pass
  env, compiled = _environment(), {}
  out = sys.stdout.buffer

  def send(obj):
    out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
    out.flush()

  send({"ready": True})
  for line in sys.stdin.buffer:
    try:
      reply = _render_one(env, compiled, json.loads(line))
    except MemoryError:
      reply = {"error": "ChatTemplateError",
               "message": f"rendering exceeded the {memory_bytes >> 20} MiB memory limit"}
    except jinja2.exceptions.TemplateSyntaxError as e:
      reply = {"error": "TemplateSyntaxError", "message": str(e.message), "lineno": e.lineno}
    except Exception as e:  # the template's own errors (raise_exception, 1/0, ...)
      reply = {"error": type(e).__name__,
               "message": " ".join(f"{type(e).__name__}: {e}".split())[:500]
               if not isinstance(e, jinja2.exceptions.TemplateError) else str(e)}
    send(reply)
