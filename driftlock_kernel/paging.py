"""Pages of a list in creation order: a cursor is the (created_at, id) of the last row shown, and the caller
sees it as an opaque page token."""

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: datetime
    id: uuid.UUID

    def token(self) -> str:
        text = f"{self.created_at.isoformat()}|{self.id}"
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")

    @classmethod
    def from_token(cls, token: str) -> "Cursor":
        """The cursor a page token stands for; ValueError when it is not one we made."""
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            moment, _, ident = text.partition("|")
            created_at = datetime.fromisoformat(moment)
            if created_at.tzinfo is None:
                raise ValueError("naive time")
            return cls(created_at, uuid.UUID(ident))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("page_token is not one this API returned") from None


def page_size(requested: int) -> int:
    """The page size to use: DEFAULT_PAGE_SIZE for 0; ValueError outside 0..MAX_PAGE_SIZE."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be from 1 to {MAX_PAGE_SIZE}")
    return requested
