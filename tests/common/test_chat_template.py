"""Chat templates from model files are untrusted: rendered in a worker process with time,
output and memory limits, each broken limit a one-line error, and the worker recovers."""

import threading

import jinja2
import pytest
import tokenizers

from common import chat_template
from common.tokenizer import Tokenizer

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🤗 <b>&"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 5 %}{% break %}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}{{ m | tojson }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
NESTED_LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                "{% endfor %}")


def _one_line(excinfo, *fragments):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for f in fragments:
    assert f in msg, msg
  return msg


def test_renders_like_transformers_environment():
  # The worker's environment is transformers' (trim/lstrip blocks, loopcontrols, tojson
  # without HTML escaping); the same template rendered in-process gives the same text.
  ctx = dict(messages=MSGS, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
  want = chat_template._environment().from_string(TEMPLATE).render(**ctx)
  assert chat_template.render(TEMPLATE, **ctx) == want
  assert '{"role": "user", "content": "Hi 🤗 <b>&"}' in want


def test_runaway_loops_hit_the_time_limit_and_the_worker_recovers():
  with pytest.raises(chat_template.ChatTemplateError) as e:
    chat_template.render(NESTED_LOOPS, source="evil/model", timeout_s=0.5, messages=[])
  _one_line(e, "chat template of evil/model", "ran past the 0.5 s limit")
  assert chat_template.render("{{ messages[0].content }}", messages=MSGS) == "Be brief."


def test_huge_strings_hit_the_memory_or_output_limit():
  with pytest.raises(chat_template.ChatTemplateError) as e:
    chat_template.render("{% set n = 1000000000 %}{{ 'a' * n }}", messages=[])
  _one_line(e, "memory limit")
  with pytest.raises(chat_template.ChatTemplateError) as e:
    chat_template.render("{% for m in range(2000) %}ab{% endfor %}", max_chars=1000, messages=[])
  _one_line(e, "exceeds the 1000-character limit")
  assert chat_template.render("{% for m in range(500) %}ab{% endfor %}", max_chars=1000,
                              messages=[]) == "ab" * 500


def test_template_errors_keep_their_class_and_are_one_line():
  with pytest.raises(jinja2.exceptions.TemplateError, match="^first must be user$"):
    chat_template.render("{{ raise_exception('first must be user') }}", messages=[])
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat_template.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages=[])
  with pytest.raises(chat_template.ChatTemplateError) as e:
    chat_template.render("{% for %}", source="m", messages=[])
  _one_line(e, "chat template of m: syntax error on line 1")
  with pytest.raises(chat_template.ChatTemplateError) as e:
    chat_template.render("{{ 1 / 0 }}", source="m", messages=[])
  _one_line(e, "ZeroDivisionError")
  with pytest.raises(ValueError) as e:
    chat_template.render("x", source="m", messages=[{"content": object()}])
  _one_line(e, "JSON-serializable")


def test_limits_hold_from_a_non_main_thread():
  # Signals and thread-based timeouts do not work off the main thread; the worker does.
  errors = []

  def run():
    try:
      chat_template.render(NESTED_LOOPS, timeout_s=0.5, messages=[])
    except chat_template.ChatTemplateError as err:
      errors.append(str(err))
  t = threading.Thread(target=run)
  t.start()
  t.join(timeout=60)
  assert not t.is_alive() and len(errors) == 1 and "0.5 s limit" in errors[0]


def test_tokenizer_renders_hostile_templates_with_limits(monkeypatch):
  monkeypatch.setattr(chat_template, "RENDER_TIMEOUT_S", 0.5)
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  for template, fragment in (("{{ 'a' * 100000000 }}", "limit"),
                             (NESTED_LOOPS, "ran past the 0.5 s limit")):
    tok = Tokenizer(backend, chat_template=template, source="hostile/model")
    with pytest.raises(ValueError) as e:
      tok.apply_chat_template([{"role": "user", "content": "x"}])
    _one_line(e, "chat template of hostile/model", fragment)
