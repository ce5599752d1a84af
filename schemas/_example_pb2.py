"""Message classes for `tf.train.Example`, without TensorFlow.

The messages of TensorFlow's `tensorflow/core/example/feature.proto` and
`example.proto` (Example, Features, Feature, BytesList, FloatList, Int64List;
same names, field numbers, types and packed encodings, proto3), built for the
installed protobuf runtime from a FileDescriptorProto, as protoc's Python
output does: TensorFlow's wheel ships no `.proto` sources and there is no
protoc here. They live in the proto package `busi.tfexample`, so they sit
beside TensorFlow's own `tensorflow.Example` in the default descriptor pool
whichever is imported first. Their bytes are TensorFlow's: the wire format
knows field numbers, not package names. `tests/test_records.py` checks the
descriptors against TensorFlow's.
"""

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format

PACKAGE = "busi.tfexample"

_FILE = text_format.Parse("""
name: "busi/tfexample/example.proto"
package: "busi.tfexample"
syntax: "proto3"
message_type {
  name: "BytesList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES }
}
message_type {
  name: "FloatList"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_FLOAT
          options { packed: true } }
}
message_type {
  name: "Int64List"
  field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64
          options { packed: true jstype: JS_STRING } }
}
message_type {
  name: "Feature"
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL
          type: TYPE_MESSAGE type_name: ".busi.tfexample.BytesList"
          oneof_index: 0 }
  field { name: "float_list" number: 2 label: LABEL_OPTIONAL
          type: TYPE_MESSAGE type_name: ".busi.tfexample.FloatList"
          oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL
          type: TYPE_MESSAGE type_name: ".busi.tfexample.Int64List"
          oneof_index: 0 }
  oneof_decl { name: "kind" }
}
message_type {
  name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".busi.tfexample.Features.FeatureEntry" }
  nested_type {
    name: "FeatureEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
            type_name: ".busi.tfexample.Feature" }
    options { map_entry: true }
  }
}
message_type {
  name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL
          type: TYPE_MESSAGE type_name: ".busi.tfexample.Features" }
}
""", descriptor_pb2.FileDescriptorProto())

# Adding the same file again (a module reload) is a no-op for the pool.
DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(
    _FILE.SerializeToString())


def _message(name: str):
  return message_factory.GetMessageClass(
      DESCRIPTOR.message_types_by_name[name])


BytesList = _message("BytesList")
FloatList = _message("FloatList")
Int64List = _message("Int64List")
Feature = _message("Feature")
Features = _message("Features")
Example = _message("Example")
