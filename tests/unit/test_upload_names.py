"""What the ledger keeps of a client's file name and media type: never a path, never junk."""

import pytest

from app.api.files import media_type_of, safe_filename


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("text/plain; charset=utf-8", "text/plain"),
        ("Application/JSONL", "application/jsonl"),
        ("application/x-www-form-urlencoded", "application/octet-stream"),  # curl's default
        ("", "application/octet-stream"),
        (None, "application/octet-stream"),
        ("text", "application/octet-stream"),
        ("text/plain\r\nX-Injected: 1", "application/octet-stream"),
        ("../../etc/passwd", "application/octet-stream"),
    ],
)
def test_media_types_are_kept_only_when_well_formed(sent: str | None, kept: str) -> None:
    assert media_type_of(sent) == kept


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("prompts.jsonl", "prompts.jsonl"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\data.csv", "data.csv"),
        ('a"b\x00c\nd.txt', "a_b_c_d.txt"),
        ("dir/", None),
        ("..", None),
        ("a/.", None),
        ("", None),
        (None, None),
        ("x" * 400, "x" * 255),
    ],
)
def test_file_names_lose_every_path_and_control_character(
    sent: str | None, kept: str | None
) -> None:
    assert safe_filename(sent) == kept
