"""The JSON the API accepts, typed: a malformed value (a seed "abc", a count null, prompts [1, 2]) is a 400 naming
the field, never a 500 from deep inside an endpoint."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .photos import FormErrors


class TrainForm(BaseModel):
    """The new-training form (form.command_line reads it as a dict)."""

    model_config = ConfigDict(extra="ignore")
    name: str = ""
    pretrained_model_name_or_path: str = ""
    photos_folder: str = ""
    trigger: str = ""
    class_word: str = ""
    preset: str = ""
    advanced: dict[str, str | bool | int | float | None] = {}
    captions: dict[str, str] = {}


class Move(BaseModel):
    position: int = 0


class Generation(BaseModel):
    checkpoint: str
    prompts: list[str]
    seed: int = 0
    count: int = Field(1, ge=1, le=64)
    guidance: float = 5.0
    steps: int = Field(25, ge=1, le=1000)


def one_line(error: ValidationError | list) -> str:
    """The first problem as `field: what is wrong`, the field named as the page names it."""
    first = (error.errors() if isinstance(error, ValidationError) else error)[0]
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    return f"{field}: {first['msg']}" if field else first["msg"]


def train_form(text: str) -> dict:
    """The form field of a new job's upload, as a dict; malformed at the form field."""
    try:
        return TrainForm.model_validate_json(text).model_dump()
    except ValidationError as error:
        raise FormErrors({"form": f"the form is malformed: {one_line(error)}"}) from None
