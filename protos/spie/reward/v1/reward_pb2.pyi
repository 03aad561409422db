from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("encoding", "data", "width", "height", "channels")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_UNSPECIFIED: _ClassVar[Image.Encoding]
        ENCODING_PNG: _ClassVar[Image.Encoding]
        ENCODING_RAW_UINT8: _ClassVar[Image.Encoding]
        ENCODING_RAW_UINT8_SHARED: _ClassVar[Image.Encoding]
    ENCODING_UNSPECIFIED: Image.Encoding
    ENCODING_PNG: Image.Encoding
    ENCODING_RAW_UINT8: Image.Encoding
    ENCODING_RAW_UINT8_SHARED: Image.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    encoding: Image.Encoding
    data: bytes
    width: int
    height: int
    channels: int
    def __init__(self, encoding: _Optional[_Union[Image.Encoding, str]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "edited", "source", "exemplars", "instruction", "mask", "metadata", "edited_tensor", "want_gradient")
    ID_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EDITED_TENSOR_FIELD_NUMBER: _ClassVar[int]
    WANT_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    edited: Image
    source: Image
    exemplars: _containers.RepeatedCompositeFieldContainer[Image]
    instruction: str
    mask: Image
    metadata: _struct_pb2.Struct
    edited_tensor: Tensor
    want_gradient: bool
    def __init__(self, id: _Optional[str] = ..., edited: _Optional[_Union[Image, _Mapping]] = ..., source: _Optional[_Union[Image, _Mapping]] = ..., exemplars: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., instruction: _Optional[str] = ..., mask: _Optional[_Union[Image, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., edited_tensor: _Optional[_Union[Tensor, _Mapping]] = ..., want_gradient: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "scorer", "deadline_unix_ms")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    scorer: str
    deadline_unix_ms: int
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., scorer: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "score", "details", "status", "error", "gradient", "texts")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Result.Status]
        STATUS_OK: _ClassVar[Result.Status]
        STATUS_INVALID_INPUT: _ClassVar[Result.Status]
        STATUS_SCORER_ERROR: _ClassVar[Result.Status]
    STATUS_UNSPECIFIED: Result.Status
    STATUS_OK: Result.Status
    STATUS_INVALID_INPUT: Result.Status
    STATUS_SCORER_ERROR: Result.Status
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    details: _containers.ScalarMap[str, float]
    status: Result.Status
    error: str
    gradient: Tensor
    texts: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., details: _Optional[_Mapping[str, float]] = ..., status: _Optional[_Union[Result.Status, str]] = ..., error: _Optional[str] = ..., gradient: _Optional[_Union[Tensor, _Mapping]] = ..., texts: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "scorer", "version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Result]
    scorer: str
    version: str
    def __init__(self, results: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., scorer: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("scorer", "version", "model_id", "device", "higher_is_better", "max_batch_size", "max_queue_delay_ms", "max_queue_size", "max_message_bytes", "max_pixels", "max_items_per_request")
    SCORER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HIGHER_IS_BETTER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    scorer: str
    version: str
    model_id: str
    device: str
    higher_is_better: bool
    max_batch_size: int
    max_queue_delay_ms: int
    max_queue_size: int
    max_message_bytes: int
    max_pixels: int
    max_items_per_request: int
    def __init__(self, scorer: _Optional[str] = ..., version: _Optional[str] = ..., model_id: _Optional[str] = ..., device: _Optional[str] = ..., higher_is_better: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_items_per_request: _Optional[int] = ...) -> None: ...

class GroundItem(_message.Message):
    __slots__ = ("id", "image", "phrase")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: Image
    phrase: str
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., phrase: _Optional[str] = ...) -> None: ...

class GroundRequest(_message.Message):
    __slots__ = ("items", "deadline_unix_ms")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[GroundItem]
    deadline_unix_ms: int
    def __init__(self, items: _Optional[_Iterable[_Union[GroundItem, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class GroundResult(_message.Message):
    __slots__ = ("id", "mask", "box", "box_score", "status", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    BOX_SCORE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    mask: Image
    box: _containers.RepeatedScalarFieldContainer[float]
    box_score: float
    status: Result.Status
    error: str
    def __init__(self, id: _Optional[str] = ..., mask: _Optional[_Union[Image, _Mapping]] = ..., box: _Optional[_Iterable[float]] = ..., box_score: _Optional[float] = ..., status: _Optional[_Union[Result.Status, str]] = ..., error: _Optional[str] = ...) -> None: ...

class GroundResponse(_message.Message):
    __slots__ = ("results", "grounder", "version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    GROUNDER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GroundResult]
    grounder: str
    version: str
    def __init__(self, results: _Optional[_Iterable[_Union[GroundResult, _Mapping]]] = ..., grounder: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
