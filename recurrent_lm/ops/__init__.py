"""Pure-JAX recurrence ops; every op has several equivalent ``impl=`` forms.

Arrays use the ``[batch, time, heads, dim]`` layout; states accumulate in
float32; every op takes an initial state, returns the final one, and takes
``segment_ids`` ``[B, T]`` for packed rows.
"""

from recurrent_lm.ops.linear_scan import linear_scan
from recurrent_lm.ops import feature_maps
from recurrent_lm.ops.causal_conv1d import causal_conv1d
from recurrent_lm.ops.softmax_attention import (
    KVCache, init_kv_cache, softmax_attention, write_kv_cache)
from recurrent_lm.ops.linear_attention import linear_attention
from recurrent_lm.ops.selective_scan import selective_scan
from recurrent_lm.ops.mlstm import mlstm
from recurrent_lm.ops.h3_ssm import h3_ssm
from recurrent_lm.ops.neural_memory import neural_memory
