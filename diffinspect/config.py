"""Typed configuration: defaults < a TOML file < command-line flags, validated with one-line errors."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from diffinspect import DiffinspectError
from diffinspect.models.recipe import Recipe
from diffinspect.vocab import Choice, Color, Device, Feed, ModelKind, ModelSize, Resize, ScheduleKind

# Share of a distilled student's inputs that carry a pasted defect to heal (train/targets.py); here, not
# in train/, so the CLI can show it without importing torch.
DISTILL_DEFECT_SHARE = 0.5


@dataclass
class DataConfig:
    color: Color = Color.AUTO  # auto looks at the training images
    # Model input: one side (square) or [height, width]; unset, `inspect train` chooses it from the
    # training frames' size and aspect ratio and defect_size (train/geometry.py).
    image_size: int | list[int] | None = None
    defect_size: int = 16  # smallest defect to keep visible, in native frame pixels
    resize: Resize = Resize.STRETCH  # for frames whose aspect ratio differs
    roi: list[int] | None = None  # x, y, width, height
    holdout: float = 0.15  # share of good images kept back for calibration
    # frame: the whole frame is resized to image_size. tiles: the frame is resized by tile_scale of its
    # native resolution and cut into overlapping image_size tiles, so small defects on large frames and
    # fine textures keep their pixels.
    feed: Feed = Feed.FRAME
    tile_scale: float = 0.5


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.UNET
    size: ModelSize = ModelSize.SMALL
    schedule: ScheduleKind = ScheduleKind.LINEAR


@dataclass
class AugmentConfig:
    # Off by default: a flip or a brightness change can turn a real defect into "normal".
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    shift: int = 0  # max shift in pixels
    brightness: float = 0.0  # max relative change


@dataclass
class TrainConfig:
    steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    t_max: int = 1000  # noise levels trained on: [0, t_max)
    seed: int = 0
    device: Device = Device.AUTO
    checkpoint_every: int = 500
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class CalibrateConfig:
    false_reject_rate: float = 0.01


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: Recipe = field(default_factory=Recipe)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


POSITIVE = {"data.defect_size", "train.steps", "train.max_minutes", "train.batch_size", "train.lr",
            "train.checkpoint_every", "train.t_max", "score.t_star", "score.steps", "score.noise_draws"}
UNIT_INTERVAL = {"data.holdout", "train.ema_decay", "score.top_k", "calibrate.false_reject_rate"}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file, then overrides given as {"section.key": value} (None = not given)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        raw = _read_toml(path, "config file")
        _apply(cfg, raw, prefix="")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffinspectError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DiffinspectError(f"{what} {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError:
        raise DiffinspectError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise DiffinspectError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DiffinspectError(f"{what} {path} is not valid TOML: {exc}") from None


def _apply(obj: Any, raw: dict[str, Any], prefix: str) -> None:
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if not dataclasses.is_dataclass(obj) or key not in {f.name for f in dataclasses.fields(obj)}:
            raise DiffinspectError(f"unknown config key: {name}")
        current = _section(obj, key) if isinstance(value, dict) else getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DiffinspectError(f"config key {name} must be a table")
            _apply(current, value, prefix=f"{name}.")
        else:
            _set(obj, key, value, name)


def _set(root: Any, key: str, value: Any, name: str | None = None) -> None:
    """Set a dotted key (on root) or a plain key (on a section), converting to the field's type."""
    obj = root
    if name is None:
        name = key
        *parents, key = key.split(".")
        for part in parents:
            obj = _section(obj, part)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise DiffinspectError(f"unknown config key: {name}")
    setattr(obj, key, _convert(value, hints[key], name))


def _section(obj: Any, key: str) -> Any:
    """The sub-table `key` of a section; an optional one left unset (score.backbone) is created with its
    defaults when a setting names it."""
    current = getattr(obj, key)
    if current is None:
        hint = typing.get_type_hints(type(obj)).get(key)
        table = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
        if table is not None:
            current = table()
            setattr(obj, key, current)
    return current


def _convert(value: Any, hint: Any, name: str) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        listed = [a for a in args if typing.get_origin(a) is list]
        hint = listed[0] if listed and isinstance(value, list | tuple) else next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):  # a table given as a plain value (a table itself goes to _apply)
        raise DiffinspectError(f"config key {name} must be a table, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise DiffinspectError(f"config key {name} must be a table, got {value!r}")
        return {k: v if args[1] is Any else _convert(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise DiffinspectError(f"config key {name} must be a list, got {value!r}")
        return [_convert(v, args[0], name) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise DiffinspectError(f"config key {name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise DiffinspectError(f"config key {name} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        # TOML and the command line both accept nan and inf; no setting here means anything with them
        # (`max_minutes = nan` would switch the budget off, `lr = nan` would train to NaN weights).
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DiffinspectError(f"config key {name} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(hint, type) and issubclass(hint, Choice):
        if isinstance(value, str) and value in hint.values():
            return hint(value)
        raise DiffinspectError(f"config key {name} must be one of {hint.listed()}; got {value!r}")
    if hint is str and not isinstance(value, str):
        raise DiffinspectError(f"config key {name} must be a string, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise DiffinspectError(f"config key {key} must be positive, got {value}")
    for key in UNIT_INTERVAL:
        value = _get(cfg, key)
        if not 0 <= value < 1:
            raise DiffinspectError(f"config key {key} must be in [0, 1), got {value}")
    size = cfg.data.image_size
    if size is not None and (isinstance(size, list) and (len(size) != 2 or min(size) <= 0)
                             or isinstance(size, int) and size <= 0):
        raise DiffinspectError(f"config key data.image_size must be a positive side or [height, width], got {size}")
    if cfg.data.roi is not None and (len(cfg.data.roi) != 4 or min(cfg.data.roi[2:]) <= 0):
        raise DiffinspectError("config key data.roi must be [x, y, width, height] with positive size")
    if not 0 < cfg.data.tile_scale <= 4:
        raise DiffinspectError(f"config key data.tile_scale must be in (0, 4], got {cfg.data.tile_scale}")
    if cfg.score.backbone is not None and (bad := cfg.score.backbone.invalid()):
        raise DiffinspectError(f"config key score.backbone.{bad[0]} must be {bad[1]}, got {bad[2]!r}")
    if cfg.score.t_star >= 1000:
        raise DiffinspectError(f"config key score.t_star must be below 1000, got {cfg.score.t_star}")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


WATCH_FILE = "inspect.toml"  # in the working directory of `inspect watch`: its [watch] table


@dataclass
class RetentionSettings:
    """`[watch.retention]`: how long results.db keeps rows and how much disk OUT's overlays and moved
    frames may take. Rows leave results.db only after every configured output acknowledged them, and only
    once OUT/archive/ holds them; files go oldest first, and only our own (OUT/overlays, OUT/ok|ng|error).

    [watch.retention]
    days = 90                       # rows older than this go to OUT/archive/YYYY-MM-DD.jsonl.gz
    disk_gb = 50                    # overlays + moved frames together (unset: no budget)
    min_free_gb = 1                 # below this free space: no overlays, no moves, until space returns
    """

    days: float = 90.0
    disk_gb: float | None = None
    min_free_gb: float = 1.0
    interval_s: float = 10.0  # how often a pass starts; each pass works in small transactions

    def validate(self, prefix: str = "watch.retention.") -> RetentionSettings:
        for key in ("days", "interval_s"):
            if getattr(self, key) <= 0:
                raise DiffinspectError(f"config key {prefix}{key} must be positive, got {getattr(self, key)}")
        if self.disk_gb is not None and self.disk_gb <= 0:
            raise DiffinspectError(f"config key {prefix}disk_gb must be positive, got {self.disk_gb}")
        if self.min_free_gb < 0:
            raise DiffinspectError(f"config key {prefix}min_free_gb cannot be negative, got {self.min_free_gb}")
        return self


ALARM_LAMBDA = 1000.0  # [watch] alarm_lambda's default


def check_alarm_lambda(value: float, name: str = "alarm_lambda") -> None:
    if not value > 1 or value == math.inf:  # NaN is refused too
        raise DiffinspectError(f"config key {name} must be a number above 1 (P(any false alarm, ever) <= 1 / "
                               f"{name}), got {value}")


@dataclass
class WatchSettings:
    """The `[watch]` table of ./inspect.toml: what `inspect watch` uses where a flag is not given (unset
    here: the command's own default). Every key is type-checked, with one line naming it.

    [watch]
    model = "model"                 # bundle for every folder
    out = "results"
    alarm_lambda = 1000             # drift alarms: P(any false alarm, ever) <= 1 / 1000
    [watch.cameras]                 # optional: a bundle (or a product of [watch.products]) per camera folder
    "camera_feed/cam2" = "model_cam2"
    [watch.products]                # optional: several products on one station (line/products.py)
    housing = "models/housing"
    cover = "models/cover"
    """

    model: str | None = None
    out: str | None = None
    backend: str | None = None
    device: str | None = None
    batch: int | None = None
    overlays: str | None = None
    overlay_format: str | None = None  # png | jpg (line/options.py)
    after: str | None = None
    max_latency_ms: float | None = None
    on_alarm: str | None = None  # flag | hold: see line/options.py
    # The drift alarms' false-alarm budget: P(any false alarm, ever) <= 1 / alarm_lambda (line/drift.py).
    # A larger one alarms a little later on a real change (the delay grows with its log).
    alarm_lambda: float = ALARM_LAMBDA
    cameras: dict[str, str] = field(default_factory=dict)
    products: dict[str, str] = field(default_factory=dict)
    mqtt: dict[str, Any] | None = None  # [watch.mqtt] and [watch.opcua]: checked by load_outputs, where the
    opcua: dict[str, Any] | None = None  # command line's URL flags join them
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    def validate(self) -> WatchSettings:
        self.retention.validate()
        check_alarm_lambda(self.alarm_lambda, "watch.alarm_lambda")
        for name, bundle in self.products.items():
            # A product is named in a sub-folder, an MQTT payload and a PLC string: one plain word.
            if not name.strip() or name != name.strip() or any(ch in name for ch in "/\\\0+#"):
                raise DiffinspectError(f"config key watch.products.{name!r} is not a product name (no spaces "
                                       f"around it, no / \\ + #)")
            if not bundle.strip():
                raise DiffinspectError(f"config key watch.products.{name} must name a bundle folder")
        return self


def load_watch_settings(path: str | Path = WATCH_FILE) -> WatchSettings:
    """The `[watch]` table of `path` (all unset when there is no such file)."""
    path = Path(path)
    settings = WatchSettings()
    if not path.exists():
        return settings
    watch = _read_toml(path, "settings file").get("watch", {})
    if not isinstance(watch, dict):
        raise DiffinspectError(f"[watch] in {path} must be a table")
    try:
        _apply(settings, watch, prefix="watch.")
        settings.validate()
    except DiffinspectError as exc:
        raise DiffinspectError(f"{path}: {exc}") from None
    return settings


# -- outputs of `inspect watch`: [watch.mqtt] and [watch.opcua] in inspect.toml -----------------------

@dataclass
class MqttConfig:
    url: str = ""  # mqtt://host:1883 or mqtts://host:8883
    station: str = ""  # {station} in topics; default: the host name
    topic: str = "diffinspect/{station}/{camera}/verdict"  # one message per frame
    event_topic: str = "diffinspect/{station}/event"  # alarms, when the station has them
    status_topic: str = "diffinspect/{station}/status"  # retained JSON: online/fallback/offline, hold, alarms, low disk
    product_topic: str = "diffinspect/{station}/product"  # retained command: the product now on the line
    version_topic: str = "diffinspect/{station}/{camera}/version"  # retained: the bundle version scoring it
    qos: int = 1  # 1 or 2: a message counts as delivered only once the broker acknowledged it
    client_id: str = ""  # default: diffinspect-{station}
    username: str | None = None
    password: str | None = None  # better: the DIFFINSPECT_MQTT_PASSWORD environment variable
    tls: bool = False  # implied by mqtts://
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    keepalive_s: int = 30
    ack_timeout_s: float = 10.0  # no acknowledgement within this: reconnect and send again


@dataclass
class OpcuaNodes:
    # NodeIds on the PLC's server, e.g. 'ns=3;s="Vision"."Reject"'. Written in this order in one request;
    # the counter last, so the PLC sees it advance once the values it goes with are in place.
    reject: str | None = None  # Boolean: true for ng and for frames that could not be scored
    score: str | None = None  # Float or Double (NaN when the frame could not be scored)
    counter: str = ""  # integer node: the frame's id in results.db, advancing by frame
    product: str | None = None  # read, not written: the node the PLC sets at a changeover ([watch.products])


@dataclass
class OpcuaConfig:
    url: str = ""  # opc.tcp://plc:4840
    nodes: OpcuaNodes = field(default_factory=OpcuaNodes)
    username: str | None = None
    password: str | None = None  # better: the DIFFINSPECT_OPCUA_PASSWORD environment variable
    security: str | None = None  # asyncua security string, e.g. "Basic256Sha256,SignAndEncrypt,cert.der,key.pem"
    timeout_s: float = 4.0
    poll_s: float = 0.2  # how often the product node is read


def load_outputs(watch: dict[str, Any], mqtt_url: str | None = None, opcua_url: str | None = None,
                 source: str = WATCH_FILE) -> tuple[MqttConfig | None, OpcuaConfig | None]:
    """The outputs of `inspect watch`: [watch.mqtt] / [watch.opcua] of inspect.toml (the `watch` table), a
    URL flag overriding the table's url. An output without a URL is off."""
    mqtt = _output_section(MqttConfig(), watch.get("mqtt"), "watch.mqtt.", source)
    opcua = _output_section(OpcuaConfig(), watch.get("opcua"), "watch.opcua.", source)
    if mqtt_url:
        mqtt.url = mqtt_url
    if opcua_url:
        opcua.url = opcua_url
    return (validate_mqtt(mqtt) if mqtt.url else None), (validate_opcua(opcua) if opcua.url else None)


def _output_section(cfg: Any, raw: Any, prefix: str, source: str) -> Any:
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise DiffinspectError(f"{source}: [{prefix.rstrip('.')}] must be a table")
    try:
        _apply(cfg, raw, prefix)
    except DiffinspectError as exc:
        raise DiffinspectError(f"{source}: {exc}") from None
    return cfg


def validate_mqtt(cfg: MqttConfig) -> MqttConfig:
    from urllib.parse import urlsplit

    try:
        url = urlsplit(cfg.url)
        url.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise DiffinspectError(f"MQTT broker URL {cfg.url!r} is not valid: {exc}") from None
    if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not url.hostname:
        raise DiffinspectError(f"MQTT broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {cfg.url!r}")
    if cfg.qos not in (1, 2):
        raise DiffinspectError(f"watch.mqtt.qos must be 1 or 2 (0 has no acknowledgement), got {cfg.qos}")
    for key in ("topic", "event_topic", "status_topic", "product_topic", "version_topic"):
        template = getattr(cfg, key)
        try:
            topic = template.format(station="s", camera="c")
        except (KeyError, IndexError, ValueError):
            raise DiffinspectError(f"watch.mqtt.{key} {template!r} may only use {{station}} and {{camera}}") from None
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise DiffinspectError(f"watch.mqtt.{key} {template!r} is not a topic one can publish to")
    if any("{camera}" in t for t in (cfg.event_topic, cfg.status_topic, cfg.product_topic)):
        raise DiffinspectError("watch.mqtt.event_topic, status_topic and product_topic are per station: no {camera}")
    if cfg.keepalive_s < 5 or cfg.ack_timeout_s <= 0:
        raise DiffinspectError("watch.mqtt.keepalive_s must be at least 5 and ack_timeout_s positive")
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise DiffinspectError("watch.mqtt.cert_file and key_file go together")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_file():
            raise DiffinspectError(f"watch.mqtt.{key}: file not found: {path}")
    _check_tls_files(cfg)
    return cfg


def _check_tls_files(cfg: MqttConfig) -> None:
    """Load the CA and client certificate once at start: a file that is not PEM, or a key that does not
    match its certificate, is refused now, not warned about on every connection attempt."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if cfg.ca_file is not None:
            ctx.load_verify_locations(cafile=cfg.ca_file)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise DiffinspectError(f"watch.mqtt.ca_file {cfg.ca_file} is not a PEM CA certificate ({exc})") from None
    try:
        if cfg.cert_file is not None:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise DiffinspectError(f"watch.mqtt.cert_file {cfg.cert_file} and key_file {cfg.key_file} are not a PEM "
                               f"certificate with its matching key ({exc})") from None


def validate_opcua(cfg: OpcuaConfig) -> OpcuaConfig:
    if not cfg.url.startswith("opc.tcp://") or len(cfg.url) <= len("opc.tcp://"):
        raise DiffinspectError(f"OPC UA server URL must look like opc.tcp://plc:4840, got {cfg.url!r}")
    if not cfg.nodes.counter and not cfg.nodes.product:
        raise DiffinspectError("OPC UA output needs watch.opcua.nodes.counter (the node the PLC sees advance), "
                               "and usually nodes.reject and nodes.score")
    if cfg.timeout_s <= 0 or cfg.poll_s <= 0:
        raise DiffinspectError("watch.opcua.timeout_s and poll_s must be positive")
    return cfg
