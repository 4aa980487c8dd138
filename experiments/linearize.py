r"""Liger's linearisation workflow on a trained Transformer of this project.

    python -m experiments.linearize --teacher=runs/demo/<time>/gpt \
        --workdir=runs/liger --steps=200

1. Reads the teacher run (a ``train.py`` work directory whose layout has
   ``attention`` slots) and builds the Liger config from it
   (``models.linearize.liger_config``: every attention slot becomes
   ``--mixer``, LoRA of rank ``--lora_rank`` on q/k/v; nothing else changes).
2. Scores the teacher and the converted model before any training (the
   teacher's weights read through Liger's mixers, ``liger_params``).
3. Fine-tunes only the LoRA parameters with ``train.py``'s loop
   (``train.init_from`` = the teacher, ``optimizer.trainable = "lora"``) on
   the teacher's data, and scores the result.

All three are scored on the same windows of the same split (``window``
mode: the teacher has full attention and learned positions). The table
gives test perplexity and the share of the Transformer recovered: the
teacher's over the model's perplexity, and the share of the conversion's
loss gap that fine-tuning closed, ``(L_converted − L) / (L_converted − L_teacher)``.
Everything lands in ``--workdir`` (the fine-tuning run and ``linearize.json``);
an existing ``--workdir`` is refused.
"""

import json
import math
import os

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import _cli
from recurrent_lm import data as data_lib
from recurrent_lm import evaluation
from recurrent_lm import models
from recurrent_lm import training

_TEACHER = flags.DEFINE_string("teacher", None, "Work directory of a trained Transformer.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New directory for the Liger run.")
_MIXER = flags.DEFINE_enum("mixer", "liger_attention", list(models.linearize.MIXERS),
                           "Liger Attention (0.5 SWA + 0.5 GLA) or the GLA alone.")
_WINDOW = flags.DEFINE_integer("window", 64, "Sliding window of liger_attention.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Rank of the LoRA deltas on q/k/v.")
_STEPS = flags.DEFINE_integer("steps", 200, "LoRA fine-tuning steps.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 1e-3, "Peak learning rate of the LoRA parameters.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Tokens of the split scored (0: all).")


def student_config(teacher, *, mixer: str, window: int, lora_rank: int, steps: int,
                   peak_lr: float, teacher_dir: str):
  """The teacher's run config with the Liger model, LoRA-only training from its weights."""
  config = teacher.copy_and_resolve_references()
  liger = models.linearize.liger_config(training.model_config(teacher), mixer=mixer,
                                        window=window, lora_rank=lora_rank)
  config.model = liger.to_dict()
  config.train.update(steps=steps, time_budget_s=0.0, init_from=os.path.abspath(teacher_dir),
                      checkpoint_every=steps)
  config.optimizer.update(peak_lr=peak_lr, end_lr=peak_lr / 100,
                          warmup_steps=min(20, steps // 10), trainable="lora")
  return config


def _score(config, params, stream, tokenizer):
  model = models.LanguageModel(training.model_config(config))
  return evaluation.perplexity(
      model, params, stream, tokenizer.byte_lengths, eod_id=tokenizer.eod_id,
      seq_len=config.data.seq_len, batch_size=config.eval.batch_size, mode="window",
      stride=min(config.eval.stride, config.data.seq_len), progress=False)


def linearize(teacher_dir: str, workdir: str, *, mixer: str, window: int, lora_rank: int,
              steps: int, peak_lr: float, max_tokens: int = 0) -> dict:
  """Runs the workflow (module docstring); returns and writes ``linearize.json``."""
  if os.path.exists(workdir):
    raise ValueError(f"workdir {workdir} exists; expected a new directory")
  teacher_config, teacher_state = training.restore_state(teacher_dir)
  config = student_config(teacher_config, mixer=mixer, window=window, lora_rank=lora_rank,
                          steps=steps, peak_lr=peak_lr, teacher_dir=teacher_dir)
  training.check_config(config)
  prepared = data_lib.prepare_dataset(config.data.data_dir or None, config.data.corpus,
                                      config.data.vocab_size)
  split = config.eval.split
  stream = np.concatenate(list(data_lib.token_stream(prepared.shards[split])))
  if max_tokens:
    stream = stream[:max_tokens + 1]

  converted = models.linearize.liger_params(
      {"params": teacher_state.params}, training.model_config(config), jax.random.key(0))
  results = {
      "transformer": _score(teacher_config, teacher_state.params, stream, prepared.tokenizer),
      "liger, converted": _score(config, converted["params"], stream, prepared.tokenizer),
  }
  summary = training.train(config, workdir)
  _, state = training.restore_state(workdir)
  results[f"liger + LoRA ({steps} steps)"] = _score(config, state.params, stream,
                                                    prepared.tokenizer)
  trainable = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                  if "lora" in training.param_path(path))
  total = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  teacher_loss = results["transformer"]["loss"]
  converted_loss = results["liger, converted"]["loss"]
  for metrics in results.values():
    metrics["ppl_recovered"] = math.exp(teacher_loss - metrics["loss"])
    gap = converted_loss - teacher_loss
    metrics["gap_closed"] = (converted_loss - metrics["loss"]) / gap if gap > 0 else None
  report = {"teacher": os.path.abspath(teacher_dir), "split": split, "mixer": mixer,
            "window": window, "lora_rank": lora_rank, "steps": steps,
            "trainable_params": trainable, "params": total,
            "train_tokens": summary["tokens_seen"], "results": results}
  training.write_json_atomic(os.path.join(workdir, "linearize.json"), report)
  return report


def format_table(report: dict) -> str:
  results = report["results"]
  scored = int(next(iter(results.values()))["tokens"])
  lines = [f"{scored:,} tokens of the {report['split']} split; LoRA rank {report['lora_rank']} "
           f"on q/k/v: {report['trainable_params']:,} of {report['params']:,} parameters "
           f"trained on {report['train_tokens']:,} tokens",
           f"{'model':<26} {'test ppl':>9} {'bits/byte':>9} {'ppl ratio':>9} {'gap closed':>10}"]
  for name, m in results.items():
    gap = "" if m["gap_closed"] is None else f"{100 * m['gap_closed']:.1f}%"
    lines.append(f"{name:<26} {m['token_perplexity']:>9.1f} {m['bits_per_byte']:>9.3f} "
                 f"{100 * m['ppl_recovered']:>8.1f}% {gap:>10}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    report = linearize(_TEACHER.value, _WORKDIR.value, mixer=_MIXER.value,
                       window=_WINDOW.value, lora_rank=_LORA_RANK.value, steps=_STEPS.value,
                       peak_lr=_PEAK_LR.value, max_tokens=_MAX_TOKENS.value)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("linearize.py", error, 2)
  print(format_table(report))
  print(f"wrote {os.path.join(_WORKDIR.value, 'linearize.json')}")


if __name__ == "__main__":
  # Required only when run: the tests import this module beside other scripts.
  flags.mark_flags_as_required(["teacher", "workdir"])
  app.run(main)
