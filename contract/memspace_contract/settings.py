"""How both memspace processes declare and load their settings, with pydantic-settings.

Each setting is one field declared with `setting(...)`: its type, default, bounds and help text,
and its environment variable (a contract with the Helm chart). `memspace serve` derives a flag
from the same declaration (MEMSPACE_DRAIN_TIMEOUT -> --drain-timeout). Loading reads a mapping
given by the caller (`os.environ` in `main`), never the process environment behind its back, so
`Settings()` is the defaults alone. A value that cannot be used raises SettingsError naming it.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

import pydantic
import pydantic_settings
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "MEMSPACE_"


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; the message names it and what is allowed."""


def setting(
    default: Any = ...,
    *,
    env: str,
    factory: Callable[[], Any] | None = None,
    help: str,
    metavar: str | None = None,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> Any:
    """One setting: `env` is its environment variable; `help` says its meaning, unit and why
    this default (or `factory` makes it); `gt`/`ge`/`le` bound it."""
    if not env.startswith(ENV_PREFIX):
        raise ValueError(f"setting {env}: environment variables start with {ENV_PREFIX}")
    if factory is not None:
        return pydantic.Field(
            default_factory=factory,
            validation_alias=env,
            description=help,
            json_schema_extra={"metavar": metavar} if metavar else None,
        )
    return pydantic.Field(
        default,
        validation_alias=env,
        description=help,
        json_schema_extra={"metavar": metavar} if metavar else None,
        gt=gt,
        ge=ge,
        le=le,
    )


class _Environment(pydantic_settings.EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name: value.strip() for name, value in self._environ.items() if value.strip()}


class Settings(BaseSettings):
    """Base of a process's settings: frozen, built from keyword arguments alone, or by `load`
    from an environment mapping and given values (flags) over it."""

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
    )
    flags: ClassVar[bool] = False
    """Whether the settings also come as command-line flags (then errors name the flag)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what the caller passes: `load` reads the environment it is handed."""
        return (init_settings,)

    @classmethod
    def env(cls, field: str) -> str:
        alias = cls.model_fields[field].validation_alias
        assert isinstance(alias, str), f"{cls.__name__}.{field} is not declared with setting()"
        return alias

    @classmethod
    def flag(cls, field: str) -> str:
        return "--" + cls.env(field).removeprefix(ENV_PREFIX).lower().replace("_", "-")

    @classmethod
    def label(cls, field: str) -> str:
        """How an error names a setting: its flag and variable, or its variable alone."""
        return f"{cls.flag(field)} (or {cls.env(field)})" if cls.flags else cls.env(field)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting; defaults resolve in `load`, so the environment can apply."""
        for name, field in cls.model_fields.items():
            if field.annotation is bool:
                parser.add_argument(
                    cls.flag(name),
                    dest=name,
                    action="store_const",
                    const="true",
                    default=None,
                    help=f"{field.description}; env {cls.env(name)}=true",
                )
                continue
            extra = field.json_schema_extra
            metavar = extra.get("metavar") if isinstance(extra, dict) else None
            default = "" if field.is_required() or field.default is None else field.default
            shown = f" (default {default})" if default != "" else ""
            parser.add_argument(
                cls.flag(name),
                dest=name,
                default=None,
                metavar=str(metavar) if metavar else None,
                help=f"{field.description}{shown}; env {cls.env(name)}",
            )

    @classmethod
    def load(cls, environ: Mapping[str, str], given: Mapping[str, Any] | None = None) -> Self:
        """Given values (None: not given) over the environment over the defaults."""
        names = {cls.env(name): name for name in cls.model_fields}
        try:
            found = _Environment(cls, environ)()
        except pydantic_settings.SettingsError as err:
            raise SettingsError(f"{_source_field(cls, err)}: {err.__cause__ or err}") from err
        values = {names.get(key, key): value for key, value in found.items()}
        values.update(
            (name, value)
            for name, value in (given or {}).items()
            if name in cls.model_fields and value is not None
        )
        try:
            return cls(**values)
        except pydantic.ValidationError as err:
            raise SettingsError(describe(cls, err)) from err


def _source_field(cls: type[Settings], err: Exception) -> str:
    for name in cls.model_fields:
        if f'"{name}"' in str(err):
            return f"{cls.label(name)} is not valid JSON"
    return "a setting is not valid JSON"


def describe(cls: type[Settings], err: pydantic.ValidationError) -> str:
    """pydantic's errors in the house's words: which setting, its value, what is allowed."""
    return "; ".join(_one(cls, error) for error in err.errors())


def _one(cls: type[Settings], error: Any) -> str:
    loc = error.get("loc") or ()
    names = {cls.env(name): name for name in cls.model_fields}
    name = names.get(loc[0], loc[0]) if loc else None
    cause = (error.get("ctx") or {}).get("error")
    if name not in cls.model_fields:
        return str(cause) if cause is not None else str(error["msg"])
    return f"{cls.label(str(name))} {_problem(cls.model_fields[str(name)], error, cause)}"


_NOT_A = {"int_parsing": "an int", "float_parsing": "a float"}


def _problem(field: FieldInfo, error: Any, cause: object) -> str:
    kind, value = error["type"], error.get("input")
    bounds = {type(m).__name__: m for m in field.metadata}
    low, high = bounds.get("Ge"), bounds.get("Le")
    if kind == "missing":
        problem = "is required"
    elif cause is not None:
        problem = f"is {value!r}: {cause}"
    elif kind == "bool_parsing":
        problem = f"is {value!r}; allowed: true, false"
    elif kind in _NOT_A:
        problem = f"is {value!r}: not {_NOT_A[kind]}"
    elif kind == "dict_type":
        problem = f'is {value!r}: not a JSON object such as {{"requests": {{}}}}'
    elif kind == "literal_error":
        allowed = ", ".join(str(arg) for arg in _literal_args(field.annotation))
        problem = f"is {value!r}; allowed: {allowed}"
    elif low is not None and high is not None:
        problem = f"is {value}; allowed {low.ge}..{high.le}"
    elif kind == "greater_than":
        problem = f"is {value}; it must be above {error['ctx']['gt']}"
    elif kind == "greater_than_equal":
        problem = f"is {value}; it must be at least {error['ctx']['ge']}"
    else:
        problem = f"is {value!r}: {error['msg']}"
    return problem


def _literal_args(annotation: Any) -> tuple[Any, ...]:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return ()
