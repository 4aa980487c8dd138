"""Inference: prefill and decode with carried state, sampling, and runs restored
from their work directories for text generation."""

from recurrent_lm.inference.decoding import decode_step
from recurrent_lm.inference.decoding import generate
from recurrent_lm.inference.decoding import max_context
from recurrent_lm.inference.decoding import pad_prompts
from recurrent_lm.inference.decoding import prefill
from recurrent_lm.inference.decoding import PROMPT_SEGMENT
from recurrent_lm.inference.decoding import stream
from recurrent_lm.inference.sampling import GREEDY, Sampling, filter_logits, sample
from recurrent_lm.inference.restore import Run, load_run
from recurrent_lm.inference.text import Detokenizer, complete, prompt_ids, stream_text
