"""The combinations the server's and the clients' extra steps cannot run in: a server optimiser
(``server_opt``), FedProx (``sim.prox_mu``) and SCAFFOLD (``control=scaffold``), each refused
with one line (docs/config.md lists them)."""

from __future__ import annotations

from fedsim import registry
from fedsim.config.hints import listed, strategies_where
from fedsim.errors import ConfigError


def check_server_opt(components) -> None:
    """A server optimiser steps the global arrays by their aggregated change: a strategy must
    have global arrays that hold its whole server step."""
    opt, strategy = components.server_opt, components.strategy
    if not opt.active:
        return
    control = components.control
    if control.active and control.lr_server != 1.0:
        raise ConfigError(
            "control.lr_server",
            control.lr_server,
            f"with server_opt={opt.name} the server optimiser takes the server's step (its "
            "server_opt.lr) on the mean change SCAFFOLD's clients send; a second server rate "
            "eta_g would scale that change first: use control.lr_server=1, or server_opt=none",
        )
    if takes_server_opt(strategy):
        return
    if strategy.folds_into_base:
        why = (
            "folds each round's change into the clients' frozen base weights, outside the "
            "global arrays"
        )
    elif not strategy.communicates:
        why = "aggregates no client updates (a reference)"
    else:  # the moments of an array would move it in the rounds it is not aggregated
        why = (
            f"{strategy.changing_parameters}: the momentum of an array's earlier rounds would "
            "move it in the rounds it is frozen"
        )
    raise ConfigError(
        "server_opt",
        opt.name,
        f"steps the global arrays by their aggregated change; strategy {strategy.name} {why}: "
        f"use {strategies_where(takes_server_opt)}, or server_opt=none",
    )


def takes_server_opt(strategy) -> bool:
    """A strategy whose global arrays change only by its aggregate (a server optimiser may
    then step them by that change)."""
    return strategy.communicates and not strategy.folds_into_base and strategy.persistent_parameters


def check_local_terms(components, spec) -> None:
    """FedProx needs parameters the client received; SCAFFOLD a server step that is a mean of
    what clients send, taken by the strategy itself, and no central DP."""
    strategy, name = components.strategy, components.strategy.name
    mu = float(components.sim.get("prox_mu", 0.0))
    if mu and set(spec.trained) <= set(strategy.personal_names(spec)):
        raise ConfigError(
            "sim.prox_mu",
            mu,
            f"FedProx keeps a client's parameters close to those it received; strategy {name}'s "
            "clients receive none of those they train (use sim.prox_mu=0)",
        )
    control = components.control
    if not control.active:
        return
    instead = strategies_where(_steps_on_a_mean)
    if not strategy.communicates:
        why = f"strategy {name} aggregates nothing"
    elif not strategy.averages:
        why = f"strategy {name}'s server step is not a mean of the arrays clients send"
    elif not strategy.persistent_parameters:
        why = f"strategy {name} {strategy.changing_parameters}"
    else:
        why = None
    if why is not None:
        raise ConfigError(
            "control",
            control.name,
            f"SCAFFOLD's variates track the server's mean of the clients' changes; {why} "
            f"(use {instead})",
        )
    feedback = components.feedback
    if feedback.replaces_aggregation:
        keeps = listed(registry.options_where("feedback", keeps_aggregation))
        raise ConfigError(
            "feedback",
            feedback.name,
            f"replaces the strategy's mean with its own server step, which control=scaffold "
            f"corrects toward (use feedback={keeps})",
        )
    if components.privacy.central:
        raise ConfigError(
            "privacy",
            components.privacy.name,
            "the control-variate changes control=scaffold clients send would reach the server "
            "without central DP's clipping and noise (use control=none, or privacy=dpsgd)",
        )


def _steps_on_a_mean(cls) -> bool:
    return cls.averages and cls.communicates and cls.persistent_parameters


def keeps_aggregation(cls) -> bool:
    return cls is not None and not getattr(cls, "replaces_aggregation", False)
