import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("org_id", "plan", "billing_status", "period_start", "period_end", "used_units", "stored_units_by_product", "included_units", "overage", "unit_cap", "ratio", "rate_limit_rps", "payment_required")
    class StoredUnitsByProductEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BILLING_STATUS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    USED_UNITS_FIELD_NUMBER: _ClassVar[int]
    STORED_UNITS_BY_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    UNIT_CAP_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_RPS_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    plan: str
    billing_status: str
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    used_units: int
    stored_units_by_product: _containers.ScalarMap[str, int]
    included_units: int
    overage: str
    unit_cap: int
    ratio: float
    rate_limit_rps: float
    payment_required: bool
    def __init__(self, org_id: _Optional[str] = ..., plan: _Optional[str] = ..., billing_status: _Optional[str] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_units: _Optional[int] = ..., stored_units_by_product: _Optional[_Mapping[str, int]] = ..., included_units: _Optional[int] = ..., overage: _Optional[str] = ..., unit_cap: _Optional[int] = ..., ratio: _Optional[float] = ..., rate_limit_rps: _Optional[float] = ..., payment_required: _Optional[bool] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("request_id", "org_id", "product", "units")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    org_id: str
    product: str
    units: int
    def __init__(self, request_id: _Optional[str] = ..., org_id: _Optional[str] = ..., product: _Optional[str] = ..., units: _Optional[int] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("accepted", "used_units", "counted_units", "cap_reached", "unit_cap")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    USED_UNITS_FIELD_NUMBER: _ClassVar[int]
    COUNTED_UNITS_FIELD_NUMBER: _ClassVar[int]
    CAP_REACHED_FIELD_NUMBER: _ClassVar[int]
    UNIT_CAP_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    used_units: int
    counted_units: int
    cap_reached: bool
    unit_cap: int
    def __init__(self, accepted: _Optional[bool] = ..., used_units: _Optional[int] = ..., counted_units: _Optional[int] = ..., cap_reached: _Optional[bool] = ..., unit_cap: _Optional[int] = ...) -> None: ...
