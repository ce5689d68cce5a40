"""The combinations a robust rule (``robust``) and Byzantine clients (``faults=byzantine``)
cannot run in, each refused with one line (docs/config.md lists them)."""

from __future__ import annotations

from fedsim import registry
from fedsim.config.hints import strategies_where
from fedsim.errors import ConfigError


def check_adversary(components) -> None:
    _check_robust(components)
    _check_byzantine(components)


def _check_robust(components) -> None:
    """A robust rule replaces the mean of an averaging strategy, and nothing else."""
    rule, strategy = components.robust, components.strategy
    if not rule.active:
        return
    from fedsim.strategy.plugins import PluginStrategy

    key, value, name = "robust", rule.name, strategy.name
    if isinstance(strategy, PluginStrategy):
        raise ConfigError(
            key,
            value,
            f"a plug-in aggregator defines its own rule, so plug-in {name}.aggregate would "
            "run instead: write the robust rule into the plug-in and run it with robust=none, "
            "or run this rule with a built-in strategy such as fedavg (docs/plugins.md)",
        )
    if not strategy.averages:
        raise ConfigError(
            key,
            value,
            f"replaces the mean of the arrays clients send; strategy {name} does not average "
            "them (FedEx and FLoRA fold individual clients' products into the base, the "
            f"references send nothing): use strategy={strategies_where(lambda c: c.averages)}",
        )
    if components.privacy.central:
        raise ConfigError(
            key,
            value,
            "privacy=central replaces the aggregation with a noised sum of clipped updates, so "
            "the robust rule would never run: use robust=none with central DP",
        )
    if components.control.active:
        raise ConfigError(
            key,
            value,
            f"control={components.control.name}'s server variate c is the plain mean of the "
            "clients' control-variate changes, which the rule does not screen, and c corrects "
            "every client's local steps, so a Byzantine client would still steer them: use "
            "control=none with a robust rule",
        )
    feedback = components.feedback
    if components.compresses and feedback.replaces_aggregation:
        keeps = registry.options_where(
            "feedback", lambda c: c is not None and not getattr(c, "replaces_aggregation", False)
        )
        raise ConfigError(
            key,
            value,
            f"feedback={feedback.name} takes its own server step instead of the strategy's "
            f"mean, so the robust rule would never run: use feedback={registry.either(keeps)}",
        )
    _check_replies(rule, components.sim)


def _check_replies(rule, sim) -> None:
    """Krum, Multi-Krum and Bulyan need enough replies for their ``f`` (and ``m``)."""
    k = sim["clients_per_round"]
    need = rule.min_updates()
    if need <= k:
        return
    m = getattr(rule, "m", None)
    if m is not None and m > k:
        raise ConfigError(
            "robust.m",
            m,
            f"robust={rule.name} averages m replies; sim.clients_per_round is {k}",
        )
    bound = {"krum": "2f + 3", "multikrum": "2f + 3", "bulyan": "4f + 3"}.get(rule.name, "")
    raise ConfigError(
        "robust.f",
        rule.f,
        f"robust={rule.name} needs at least {bound} = {need} replies per round; "
        f"sim.clients_per_round is {k} (lower robust.f or raise sim.clients_per_round)",
    )


def _check_byzantine(components) -> None:
    attack = components.faults.byzantine
    if attack is None:
        return
    strategy, n = components.strategy, components.sim["num_clients"]
    fraction = attack.fraction
    if not strategy.communicates:
        raise ConfigError(
            "faults.byzantine_fraction",
            fraction,
            f"strategy {strategy.name} sends no updates to attack (use strategy="
            f"{strategies_where(lambda c: c.communicates)})",
        )
    if attack.count(n) == 0:
        raise ConfigError(
            "faults.byzantine_fraction",
            fraction,
            f"makes floor({fraction:g} * sim.num_clients={n}) = 0 malicious clients: raise it "
            f"to at least {1 / n:g}, or set it to 0",
        )
    task = components.task
    if attack.kind == "label_flip" and not isinstance(getattr(task, "num_classes", None), int):
        raise ConfigError(
            "faults.attack",
            attack.kind,
            f"flips class labels (y -> C - 1 - y); task {task.name} has no classes: use "
            "sign_flip, scaled, gaussian or alie",
        )
    if attack.kind == "alie":
        why = None
        if components.compresses:
            why = f"compressor={components.compressor.name} encodes them on the client"
        elif components.privacy.central:
            why = "privacy=central clips them on the client"
        if why is None and components.control.active:
            raise ConfigError(
                "faults.attack",
                "alie",
                "the server replaces the attackers' model arrays with mu - z sigma of the benign "
                f"ones, but not the control-variate changes control={components.control.name} "
                "clients send, which would stay honest: use sign_flip, scaled, gaussian or "
                "label_flip (whose changes follow the attacked update), or control=none",
            )
        if why is not None:
            raise ConfigError(
                "faults.attack",
                "alie",
                "the server replaces the attackers' replies with mu - z sigma of the benign "
                f"ones as they arrive (an omniscient attacker), which needs the plain arrays; {why}"
                ": use another attack, or this one without",
            )
