"""Server optimisers (``server_opt``): strategies whose global arrays do not hold their whole
server step, bad settings, and a resume that would change the optimiser."""

from tests.bad_inputs import STOPPED_ARGS, Case, small

STEPS = "server_opt=adam: steps the global arrays by their aggregated change"

CASES = [
    Case(
        "server-opt-fedex", small("strategy=fedex", "server_opt=adam"), f"{STEPS}; strategy FedEx"
    ),
    Case("server-opt-flora", small("strategy=flora", "server_opt=adam"), "FLoRA folds each"),
    Case("server-opt-local", small("strategy=local", "server_opt=adam"), "Local aggregates no"),
    Case(
        "server-opt-centralized",
        small("strategy=centralized", "server_opt=adam"),
        "use fedavg, fedsa, fedsb, ffa or hetlora, or server_opt=none",
    ),
    Case("server-opt-unknown", small("server_opt=sgd"), "server_opt=sgd: unknown option"),
    Case("server-opt-lr-zero", small("server_opt=adam", "server_opt.lr=0"), "server_opt.lr=0"),
    Case("server-opt-beta1-one", small("server_opt=yogi", "server_opt.beta1=1"), "[0, 1)"),
    Case("server-opt-tau-negative", small("server_opt=adagrad", "server_opt.tau=-1"), "tau=-1"),
    Case("server-opt-momentum", small("server_opt=avgm", "server_opt.momentum=1.5"), "momentum"),
    Case("server-opt-nesterov", small("server_opt=avgm", "server_opt.nesterov=maybe"), "nesterov"),
    Case(
        "server-opt-unknown-key",
        small("server_opt=avgm", "+server_opt.beta2=0.9"),
        "server_opt.beta2=0.9: unknown key; allowed: lr, momentum, nesterov",
    ),
    Case(
        "server-opt-resume-changes-it",
        (*STOPPED_ARGS, "hydra.run.dir={run}", "resume=true", "server_opt=avgm"),
        "has server_opt=None",
        folder="stopped",
    ),
    Case(
        "server-opt-scaffold-second-rate",
        small("server_opt=adam", "control=scaffold", "control.lr_server=0.5"),
        "control.lr_server=0.5: with server_opt=adam the server optimiser takes the server's step",
    ),
]
