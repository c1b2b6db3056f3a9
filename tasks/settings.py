"""One typed settings object: places and knobs, read from ``TRAIN_MNIST_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.download.locations import check_source

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MIRROR = PROJECT_ROOT / "data" / "mirror"
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_RETRIES = 3  # network faults only; wrong bytes and missing files fail at once
DOWNLOAD_RETRY_BACKOFF_S = 2.0  # delays b, 2b, 4b, ...
# The biggest bundled file is 30 MB; a 10-minute deadline leaves a slow 1 Mbit/s link room for 60 MB.
DOWNLOAD_DEADLINE_S = 600.0
# All attempts at one file together (waits between them included): a mirror that trickles fails the default
# run's two datasets (one file each before they stop) within 15 minutes; 30 MB in 6 minutes needs 0.7 Mbit/s.
DOWNLOAD_TOTAL_DEADLINE_S = 360.0
DOWNLOAD_MAX_BYTES = 256 << 20


class Settings(BaseSettings):
    """Where data comes from and goes to. Nothing is created until a stage writes."""

    model_config = SettingsConfigDict(env_prefix="TRAIN_MNIST_", extra="ignore")

    source: str = Field(
        default=str(BUNDLED_MIRROR),
        description="Mirror to download from: directory, file:// or http(s):// URL with the datasets' layout.",
    )
    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="Raw files, Parquet and run reports.")
    registry: str | None = Field(default=None, description="Model registry: a folder (default <data_dir>/registry) "
                                 "or an MLflow tracking server, http(s)://host:port.")
    datasets_file: Path | None = Field(default=None, description="TOML file with extra dataset definitions.")
    download_timeout_s: float = Field(default=DOWNLOAD_TIMEOUT_S, gt=0, description="Socket timeout of one read.")
    download_deadline_s: float = Field(default=DOWNLOAD_DEADLINE_S, gt=0,
                                       description="Time one attempt at a file may take, headers included.")
    download_total_deadline_s: float = Field(default=DOWNLOAD_TOTAL_DEADLINE_S, gt=0,
                                             description="Time all attempts at one file may take together.")
    download_max_bytes: int = Field(default=DOWNLOAD_MAX_BYTES, gt=0, description="Largest file downloaded.")
    download_retries: int = Field(default=DOWNLOAD_RETRIES, ge=0)
    download_retry_backoff_s: float = Field(default=DOWNLOAD_RETRY_BACKOFF_S, ge=0, description="Delays are b, 2b, 4b, ...")

    @field_validator("source")
    @classmethod
    def _allowed_source(cls, value: str) -> str:
        return check_source(value)

    @property
    def registry_location(self) -> str:
        return self.registry if self.registry is not None else str(self.data_dir / "registry")

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def parquet_dir(self) -> Path:
        return self.data_dir / "parquet"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"


def settings_problems(exc: Exception) -> str:
    """A settings (or datasets) error as one line per problem, without the values themselves: a location may
    hold a password, and pydantic's own message would quote it."""
    if isinstance(exc, ValidationError):
        return "invalid settings: " + "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors())
    return str(exc)
