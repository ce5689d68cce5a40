"""Names shared by the ServerApp, the ClientApp and the results files, defined once."""

# Records inside a Message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: the adapter payload
CONFIG = "config"  # ConfigRecord: round number and instructions
METRICS = "metrics"  # MetricRecord: client-side metrics

# Keys inside those records.
SERVER_ROUND = "server-round"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
VAL_LOSS = "val_loss"  # on the validation split held out of the test set (sim.validation_fraction)
VAL_ACCURACY = "val_accuracy"
LOCAL_STEPS = "local_steps"

# Flower's node_config keys (the simulation engines set them on every node).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

# Records that persist in a client's Context.state across rounds.
STATE_CLIENT = "fedsim.client"  # ConfigRecord: the client's global step count...
STEPS = "steps"  # ...under this key
STATE_OPTIMIZER = "fedsim.optimizer"  # ArrayRecord: optimizer state when it is kept
STATE_FROZEN = "fedsim.frozen"  # ArrayRecord: frozen adapter factors the server sent once
STATE_PERSONAL = "fedsim.personal"  # ArrayRecord: parameters a client keeps to itself
STATE_BASE = "fedsim.base"  # ArrayRecord: changes folded into the client's frozen base...
STATE_BASE_VERSION = "fedsim.base-version"  # ConfigRecord: ...up to this round (key VERSION)
VERSION = "version"
STATE_FEEDBACK = "fedsim.feedback"  # ArrayRecord: error-feedback memories (float64)
STATE_DOWNLINK = "fedsim.downlink"  # ArrayRecord: EF21-P's w as the client holds it
STATE_PENDING = "fedsim.feedback-pending"  # ArrayRecord: the last compressed message sent...
STATE_PENDING_INFO = "fedsim.feedback-pending-info"  # ConfigRecord: ...its round, first or not
STATE_PRIVACY = "fedsim.privacy"  # ArrayRecord: the client's accountant history
STATE_CONTROL = "fedsim.control"  # ArrayRecord: SCAFFOLD's client control variate (float64)...
STATE_CONTROL_PENDING = "fedsim.control-pending"  # ArrayRecord: ...its last change sent...
STATE_CONTROL_INFO = "fedsim.control-pending-info"  # ConfigRecord: ...in this round
EPSILON = "epsilon"  # MetricRecord keys of a DP client's reply
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
RAW_EXTRA = "raw-extra-bytes"  # MetricRecord key: fixed-width bytes minus the coded ones sent
DELAY = "simulated-delay-s"  # MetricRecord key: a straggler's simulated delay (fedsim.faults)
ABSORBED = "absorbed"  # ConfigRecord key: the last round the server aggregated your message
CONTROL_ABSORBED = "control-absorbed"  # the same for SCAFFOLD's variates (fedsim.control)
CONTROL = "control"  # ArrayRecord of a reply: SCAFFOLD's change of the client's variate

# A reply's side channel: the uncompressed trained arrays, for the aggregation error only
# (not traffic: the simulator measures with them, a real client would not send them).
DIAGNOSTIC = "diagnostic"
STATE_BYTES = "state-bytes"  # MetricRecord key: bytes of arrays in the client's Context.state

# Message actions beyond Flower's default ones ("train.<action>").
ACTION_INIT = "init"  # LoRA-SB's set-up round: clients send base-weight gradients
INIT_EXAMPLES = "init-examples"  # ConfigRecord key: how many examples a client uses for it

# The checkpoint's file name inside a run folder (fedsim.checkpoint writes and reads it).
CHECKPOINT_FILE = "checkpoint.safetensors"

# run_config keys understood by the apps when they are started by `flwr run`.
RUN_OVERRIDES = "overrides"
RUN_OUTPUT_DIR = "output-dir"
