"""Where Label Studio runs and how to log in: machine settings (env / `.env`), not flow config."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class LabelStudioSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CVOPS_LABEL_STUDIO_URL", "LABEL_STUDIO_URL"),
        description="Label Studio base URL, e.g. http://127.0.0.1:8090 (`cvops up` sets it)",
    )
    token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CVOPS_LABEL_STUDIO_TOKEN", "LABEL_STUDIO_API_KEY"),
        description="legacy API token of a Label Studio user (Account & Settings)",
    )

    def require(self) -> tuple[str, str]:
        """(url, token), or one error naming the variable that is missing."""
        if not self.url:
            raise ValueError(
                "CVOPS_LABEL_STUDIO_URL is not set: start the stack (`cvops up` runs Label "
                "Studio) or point it at a Label Studio server"
            )
        if self.token is None or not self.token.get_secret_value():
            raise ValueError(
                "CVOPS_LABEL_STUDIO_TOKEN is not set: the legacy API token of a Label Studio "
                "user (`cvops up` generates one into its secrets)"
            )
        return self.url, self.token.get_secret_value()
