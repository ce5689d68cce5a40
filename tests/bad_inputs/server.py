"""What the server computes from a user's plug-in aggregator (docs/plugins.md): a result that is
not finite, wrongly shaped or not a dict fails the run (exit 1) naming the plug-in's class,
never a client; a plug-in that a stage's own step would never call, or that breaks the
contract, is refused before anything is written (exit 2) naming the user's class.

Each case writes the user's module into its scratch folder (the command's working directory,
first on ``sys.path`` under ``python -m``) and a config folder ``{tmp}/conf`` naming the
class; no bytecode is written next to the module, so a refused run adds no file.
"""

from pathlib import Path

from tests.bad_inputs import Case, small

MODULE = """
import numpy as np

from fedsim.strategy import AdapterStrategy


def mean(current, updates):
    return {k: np.mean([u.arrays[k] for u in updates], axis=0) for k in current}


class NaNMean:
    def aggregate(self, server_round, current, updates):
        return {k: np.full(v.shape, np.nan) for k, v in current.items()}


class OneInf:
    def aggregate(self, server_round, current, updates):
        new = mean(current, updates)
        new[sorted(new)[0]].flat[0] = np.inf
        return new


class Huge:
    def aggregate(self, server_round, current, updates):
        return {k: np.full(v.shape, 1e300) for k, v in current.items()}


class Transposed:
    def aggregate(self, server_round, current, updates):
        new = mean(current, updates)
        name = next(k for k, v in new.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
        new[name] = new[name].T
        return new


class ExtraName:
    def aggregate(self, server_round, current, updates):
        return {**mean(current, updates), "momentum": np.zeros(3)}


class AsList:
    def aggregate(self, server_round, current, updates):
        return list(mean(current, updates).values())


class TextMetric:
    def aggregate(self, server_round, current, updates):
        return mean(current, updates), {"trimmed": "two clients"}


class RobustAverage:
    averages = True

    def aggregate(self, server_round, current, updates):
        return {k: np.median([u.arrays[k] for u in updates], axis=0) for k in current}


class Plain:
    def aggregate(self, server_round, current, updates):
        return mean(current, updates)


class YesAverages:
    averages = "yes"

    def aggregate(self, server_round, current, updates):
        return mean(current, updates)


class OldStyle(AdapterStrategy):
    def aggregate(self, server_round, current, updates):
        return mean(current, updates)

    def aggregate_train(self, server_round, replies):
        raise AssertionError("never called")
"""

CLASSES = (
    "NaNMean OneInf Huge Transposed ExtraName AsList TextMetric RobustAverage Plain "
    "YesAverages OldStyle"
).split()


def _plugins(run: Path, tmp: Path) -> None:
    """The user's module in the working directory, one strategy file per class."""
    (tmp / "user_rules.py").write_text(MODULE)
    folder = tmp / "conf" / "strategy"
    folder.mkdir(parents=True)
    for name in CLASSES:
        (folder / f"{name.lower()}.yaml").write_text(f"_target_: user_rules.{name}\n")


NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}
CENTRAL = ("privacy=central", "sim.num_clients=8", "sim.clients_per_round=4")


def _case(id: str, strategy: str, says: str, *extra: str, code: int = 2) -> Case:
    args = ("--config-dir", "{tmp}/conf", *small(f"strategy={strategy}", *extra))
    return Case(id, args, says, code=code, prepare=_plugins, env=NO_BYTECODE)


CASES = [
    # the run fails at round 1, naming the plug-in's class and the array (exit 1)
    _case("server-plugin-nan", "nanmean", "round 1: NaNMean.aggregate returned ", code=1),
    _case("server-plugin-one-inf", "oneinf", "OneInf.aggregate returned ", code=1),
    _case("server-plugin-overflow", "huge", "once cast to float32", code=1),
    _case("server-plugin-transposed", "transposed", "the global array has shape", code=1),
    _case("server-plugin-extra-name", "extraname", "unexpected ['momentum']", code=1),
    _case("server-plugin-not-a-dict", "aslist", "AsList.aggregate returned list", code=1),
    _case("server-plugin-text-metric", "textmetric", "metrics are numbers", code=1),
    # refused before anything is written, naming the user's class (exit 2)
    _case(
        "server-averaging-plugin-ef21",
        "robustaverage",
        "plug-in RobustAverage.aggregate would never be called (its averages = True",
        "compressor=topk",
        "feedback=ef21",
    ),
    _case(
        "server-averaging-plugin-econtrol",
        "robustaverage",
        "feedback=econtrol: its server step replaces the aggregation",
        "compressor=topk",
        "feedback=econtrol",
    ),
    _case(
        "server-averaging-plugin-central",
        "robustaverage",
        "privacy=central: central DP's noised mean replaces the aggregation, so plug-in "
        "RobustAverage",
        *CENTRAL,
    ),
    _case("server-plain-plugin-central", "plain", "Plain declares averages = False", *CENTRAL),
    _case(
        "server-plain-plugin-ef21",
        "plain",
        "Plain declares averages = False",
        "compressor=topk",
        "feedback=ef21",
    ),
    _case(
        "server-plugin-averages-not-bool",
        "yesaverages",
        "YesAverages.averages = 'yes': must be True or False",
    ),
    _case("server-strategy-old-hook", "oldstyle", "OldStyle defines aggregate_train()"),
]
