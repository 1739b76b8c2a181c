"""Service settings, from environment variables (STREAMEDIT_*) and command-line flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engines.client import DEFAULT_MAX_BATCH, MAX_SAMPLER_STEPS, BackendName, EngineMode, EngineSpec, PrecisionName
from server.jitter import RECEIVE_RULE_MEANINGS, ReceiveRule

CLIENT_WEB_DIR = Path(__file__).resolve().parent.parent / "client_web"
#: A replica's name: a DNS label, so a StatefulSet pod's own name (streamedit-0) can serve as it.
REPLICA_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def default_media_workers() -> int:
    """Half the cores, 1 to 8: media costs ~0.1 core a session at 256², and the engine wants cores too."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class IceServer(BaseModel):
    """A STUN or TURN server handed to aiortc (and to browsers) for NAT traversal."""

    urls: list[str] | str
    username: str | None = None
    credential: str | None = None


class Settings(BaseSettings):
    """Everything the service can be told; each field is also a flag of `streamedit serve`."""

    model_config = SettingsConfigDict(env_prefix="STREAMEDIT_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    replica: str | None = Field(
        None,
        pattern=REPLICA_PATTERN,
        description="This server's name in a fleet (a DNS label, e.g. the pod's name). Session ids then start "
        "with it and a dot, and every response names it (X-StreamEdit-Replica), so a proxy can send each "
        "session's later calls to the replica that holds its peer connection (deploy/).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    resolution: int | None = Field(None, ge=64, le=2048, description="Editor resolution (default: the model's).")
    steps: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLER_STEPS,
        description=EngineSpec.model_fields["steps"].description,
    )
    max_sessions: int = Field(4, ge=1, le=1024, description="Sessions beyond this get 503 with Retry-After.")
    max_batch: int = Field(
        DEFAULT_MAX_BATCH, ge=1, le=64, description="Most frames (one per session) in one engine call."
    )
    engine: EngineMode = Field(
        "process",
        description="'process': the engine core in a process of its own, restarted if it dies (the default); "
        "'thread': on a thread of the one media process (debugging).",
    )
    media_workers: int = Field(
        default_factory=lambda: default_media_workers(),
        ge=1,
        le=64,
        description="Processes that run WebRTC media and the HTTP API, all feeding the one engine process "
        "(default: half the cores, 1 to 8).",
    )
    backend: BackendName = Field(EngineSpec.model_fields["backend"].default, description="Engine backend.")
    precision: PrecisionName = Field(
        EngineSpec.model_fields["precision"].default, description=EngineSpec.model_fields["precision"].description
    )
    device: str = Field("cpu", description="'cpu' or 'cuda[:N]'.")
    cuda_graph: bool = Field(
        False,
        description="Torch backend on CUDA: replay one captured CUDA graph per batch size (on an H100, 4.6x eager's "
        "frames/s for 1 frame a call, 3.6x for 16: bench/results/engine_gpu_default_2026-11-22.md).",
    )
    weights: Path | None = Field(None, description="Model folder (default: the shipped default editor).")
    taesd: Path | None = Field(None, description="TAESD folder overriding the model's own autoencoder.")
    threads: int | None = Field(None, ge=1, description="CPU threads for the engine (default: all cores).")
    cache_dir: Path | None = Field(None, description="Where exported graphs / TensorRT engines are cached.")
    ice_servers: list[IceServer] = Field(
        default_factory=list,
        description="STUN/TURN servers as JSON. Empty by default: aiortc would otherwise use a public STUN server.",
    )
    ice_host_addresses: list[str] | None = Field(
        None,
        description="Local addresses offered as ICE host candidates. Default: 127.0.0.1 when bound to a "
        "loopback address (aioice leaves loopback out on its own), else every non-loopback interface. "
        "A deployment behind NAT pins its public address here.",
    )
    udp_ports: str | None = Field(
        None,
        pattern=r"^\d{1,5}-\d{1,5}$",
        description="Bind WebRTC media (ICE) to this UDP port range, e.g. 40000-40100; default any port.",
    )
    receive_rule: ReceiveRule = Field(
        "marker",
        description="When a camera frame is complete: "
        + "; ".join(f"'{rule}', {meaning}" for rule, meaning in RECEIVE_RULE_MEANINGS.items())
        + ".",
    )
    connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Reap a session whose peer has not connected by then (ICE takes well under a second on a "
        "LAN, a few over TURN); until it connects, a session holds no engine slot.",
    )
    max_pending: int = Field(
        16,
        ge=1,
        le=4096,
        description="Answered offers whose peers have not connected yet, per media worker; more get 503 "
        "(Retry-After 1). Apart from --max-sessions, so that offers nobody completes can't lock out those who do.",
    )
    camera_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Reap a connected session whose camera has sent no frame for this long (a peer killed "
        "outright leaves ICE connected for half a minute; its camera stops at once).",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After seconds sent with a 503 when full.")
    max_negotiations: int = Field(
        8, ge=1, le=256, description="Offers negotiated at once by one media worker; more get 503 (Retry-After 1)."
    )
    offers_per_minute: float | None = Field(
        None,
        gt=0,
        description="Per client address and media worker: new sessions a minute (429 + Retry-After beyond); "
        "off by default. Behind a proxy on this host, the address is X-Forwarded-For's (uvicorn trusts 127.0.0.1; "
        "the FORWARDED_ALLOW_IPS environment variable names other proxies).",
    )
    offer_burst: int = Field(
        5, ge=1, le=1000, description="Offers a client may open at once under --offers-per-minute."
    )
    patch_rate: float = Field(
        10.0,
        ge=0,
        description="PATCHes a second allowed per session, counted where it lives (429 + Retry-After beyond); 0: "
        "no limit. Every PATCH of a new prompt costs a text encoding.",
    )
    patch_burst: int = Field(20, ge=1, le=10_000, description="PATCHes a session may send at once.")
    client_patch_rate: float = Field(
        40.0,
        ge=0,
        description="PATCHes a second allowed per client address and media worker, whatever session they change "
        "(429 + Retry-After beyond; one address may hold several sessions); 0: no limit.",
    )
    client_patch_burst: int = Field(80, ge=1, le=100_000, description="PATCHes a client address may send at once.")
    prompt_cache_size: int = Field(
        EngineSpec.model_fields["prompt_cache_size"].default,
        ge=1,
        le=100_000,
        description=EngineSpec.model_fields["prompt_cache_size"].description,
    )
    max_prompt_encodings: int = Field(
        EngineSpec.model_fields["max_prompt_encodings"].default,
        ge=1,
        le=1024,
        description=EngineSpec.model_fields["max_prompt_encodings"].description,
    )
    prompt_cpu_share: float = Field(
        EngineSpec.model_fields["prompt_cpu_share"].default,
        gt=0,
        le=1,
        description=EngineSpec.model_fields["prompt_cpu_share"].description,
    )
    camera_max_kbps: int = Field(
        1000,
        ge=50,
        le=100_000,
        description="Most camera video a session may send, in kbit/s: the cap in the SDP answer (b=AS, b=TIAS), "
        "which browsers honour. The editor's square needs far less than a 720p or 1080p camera sends.",
    )
    camera_max_fps: int = Field(
        30,
        ge=1,
        le=120,
        description="Camera frame rate the page asks for at most; the engine takes at most one frame a batch per "
        "session anyway, so frames beyond it are only decoded and dropped.",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest request body accepted (413 beyond); an SDP offer is a few KiB."
    )
    metrics_per_session: bool = Field(
        False,
        description="Also export per-session series labelled with session ids (one media worker only); off by "
        "default, since /metrics is not authenticated.",
    )
    static_dir: Path = Field(CLIENT_WEB_DIR, description="The web page served at /.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @model_validator(mode="after")
    def _engine_fits(self) -> Settings:
        self.engine_spec()  # cuda_graph only on torch + CUDA, and the rest of EngineSpec's checks
        if self.engine == "thread" and self.media_workers > 1:
            raise ValueError(f"the in-thread engine serves one media worker, not {self.media_workers}")
        return self

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            weights=self.weights,
            taesd=self.taesd,
            backend=self.backend,
            device=self.device,
            resolution=self.resolution,
            steps=self.steps,
            threads=self.threads,
            max_batch=self.max_batch,
            cache_dir=self.cache_dir,
            cuda_graph=self.cuda_graph,
            precision=self.precision,
            prompt_cache_size=self.prompt_cache_size,
            max_prompt_encodings=self.max_prompt_encodings,
            prompt_cpu_share=self.prompt_cpu_share,
        )

    def host_addresses(self) -> list[str] | None:
        """The addresses to pin as ICE host candidates, or None for aioice's own choice."""
        if self.ice_host_addresses is not None:
            return self.ice_host_addresses
        if self.host.startswith("127.") or self.host in ("localhost", "::1"):
            return ["127.0.0.1"]
        return None
