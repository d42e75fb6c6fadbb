import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from driftlock_api.management.v1 import orgs_pb2 as _orgs_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateOrganizationRequest(_message.Message):
    __slots__ = ("org_id", "max_overage_units")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_OVERAGE_UNITS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    max_overage_units: _struct_pb2.Value
    def __init__(self, org_id: _Optional[str] = ..., max_overage_units: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class DeleteOrganizationRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class DeleteOrganizationResponse(_message.Message):
    __slots__ = ("org_id", "deleted_at", "keys_revoked")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_AT_FIELD_NUMBER: _ClassVar[int]
    KEYS_REVOKED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    deleted_at: _timestamp_pb2.Timestamp
    keys_revoked: int
    def __init__(self, org_id: _Optional[str] = ..., deleted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., keys_revoked: _Optional[int] = ...) -> None: ...
