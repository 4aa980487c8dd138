"""Training: optimizer, sharding rules, the train step, checkpoints and the loop."""

from recurrent_lm.training.checkpoint import Checkpointer
from recurrent_lm.training.loop import (
    CONFIG_VERSION, TOKENIZER_FILE, check_config, load_config, model_config, restore_mesh,
    restore_state, step_seconds, train, write_json_atomic)
from recurrent_lm.training.optimizer import learning_rate, make_optimizer, param_path
from recurrent_lm.training.sharding import RULES, batch_sharding, make_mesh
from recurrent_lm.training.step import TrainState, init_state, make_train_step
