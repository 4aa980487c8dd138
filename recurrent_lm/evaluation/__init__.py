"""Evaluation: perplexity (token and per byte) on a split; JRT-Prompt and answer scoring;
accuracy on the synthetic recall tasks."""

from recurrent_lm.evaluation.perplexity import MODES, default_mode, perplexity
from recurrent_lm.evaluation.prompts import answer_log_likelihood, jrt_prompt
from recurrent_lm.evaluation.recall import accuracy, make_predict
