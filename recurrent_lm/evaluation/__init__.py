"""Evaluation: perplexity (token and per byte) on a split."""

from recurrent_lm.evaluation.perplexity import MODES, default_mode, perplexity
