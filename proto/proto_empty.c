/* Placeholder translation unit used only while proto/ holds no .proto file. */
typedef int stp_proto_empty_unit;
