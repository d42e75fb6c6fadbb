from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Plan(_message.Message):
    __slots__ = ("name", "included_units", "overage", "hard_cap_percent", "rate_limit_rps", "stripe_price_ids", "stripe_meter", "test_included_units", "test_rate_limit_rps", "products")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    HARD_CAP_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_RPS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_PRICE_IDS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_METER_FIELD_NUMBER: _ClassVar[int]
    TEST_INCLUDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    TEST_RATE_LIMIT_RPS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    included_units: int
    overage: str
    hard_cap_percent: int
    rate_limit_rps: float
    stripe_price_ids: _containers.RepeatedScalarFieldContainer[str]
    stripe_meter: str
    test_included_units: int
    test_rate_limit_rps: float
    products: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., included_units: _Optional[int] = ..., overage: _Optional[str] = ..., hard_cap_percent: _Optional[int] = ..., rate_limit_rps: _Optional[float] = ..., stripe_price_ids: _Optional[_Iterable[str]] = ..., stripe_meter: _Optional[str] = ..., test_included_units: _Optional[int] = ..., test_rate_limit_rps: _Optional[float] = ..., products: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPlansRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPlansResponse(_message.Message):
    __slots__ = ("plans",)
    PLANS_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PutPlanRequest(_message.Message):
    __slots__ = ("name", "included_units", "overage", "hard_cap_percent", "rate_limit_rps", "stripe_price_ids", "stripe_meter", "test_included_units", "test_rate_limit_rps", "products")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    HARD_CAP_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_RPS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_PRICE_IDS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_METER_FIELD_NUMBER: _ClassVar[int]
    TEST_INCLUDED_UNITS_FIELD_NUMBER: _ClassVar[int]
    TEST_RATE_LIMIT_RPS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    included_units: int
    overage: str
    hard_cap_percent: _struct_pb2.Value
    rate_limit_rps: _struct_pb2.Value
    stripe_price_ids: _struct_pb2.Value
    stripe_meter: _struct_pb2.Value
    test_included_units: int
    test_rate_limit_rps: float
    products: _struct_pb2.Value
    def __init__(self, name: _Optional[str] = ..., included_units: _Optional[int] = ..., overage: _Optional[str] = ..., hard_cap_percent: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., rate_limit_rps: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stripe_price_ids: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., stripe_meter: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., test_included_units: _Optional[int] = ..., test_rate_limit_rps: _Optional[float] = ..., products: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
