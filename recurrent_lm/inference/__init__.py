"""Inference: prefill and decode with carried state, and sampling."""

from recurrent_lm.inference.generate import generate, max_context, pad_prompts, stream
from recurrent_lm.inference.sampling import GREEDY, Sampling, filter_logits, sample
