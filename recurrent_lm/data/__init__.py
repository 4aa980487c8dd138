"""Data: corpora, the BPE tokenizer, ArrayRecord token shards, grain pipelines.

    data = prepare_dataset(corpus="default", vocab_size=16384)   # cached under resolve_data_dir()
    ds = lm_dataset(data.shards["train"], seq_len=512, batch_size=32, seed=0)
    it = iter(ds)            # checkpointable: it.get_state() / it.set_state(state)
    batch = next(it)         # inputs, targets, segment_ids, positions: [32, 512] int32

Row r of every batch is a packed stream of its own, so the global batch is the
same on any number of processes; ``merge_data_states`` joins the processes'
iterator states so a run resumes on another process count.

``prepare_corpus`` → ``train_tokenizer`` → ``prepare_dataset`` are the three
stages, each cached and written atomically; ``read_documents`` and
``token_stream`` read a split back in order, for evaluation.
"""

from recurrent_lm.data.corpus import SPLITS
from recurrent_lm.data.corpus import prepare_corpus
from recurrent_lm.data.corpus import read_documents
from recurrent_lm.data.corpus import resolve_data_dir
from recurrent_lm.data.pipeline import DataStateError
from recurrent_lm.data.pipeline import PreparedData
from recurrent_lm.data.pipeline import lm_dataset
from recurrent_lm.data.pipeline import merge_data_states
from recurrent_lm.data.pipeline import prepare_dataset
from recurrent_lm.data.pipeline import token_stream
from recurrent_lm.data.tokenizer import Tokenizer
from recurrent_lm.data.tokenizer import train_tokenizer

__all__ = [
    "SPLITS",
    "DataStateError",
    "PreparedData",
    "Tokenizer",
    "lm_dataset",
    "merge_data_states",
    "prepare_corpus",
    "prepare_dataset",
    "read_documents",
    "resolve_data_dir",
    "token_stream",
    "train_tokenizer",
]
