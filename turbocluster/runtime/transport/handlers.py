"""gRPC method handlers by call shape, for the server interceptors that wrap or replace one.

A handler is one of four shapes (unary or streaming request x unary or
streaming response); an interceptor that swaps the function must keep the
shape, or gRPC calls it the wrong way.
"""

import grpc

_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def shape(handler):
    """``(request_streaming, response_streaming)``."""
    return handler.request_streaming, handler.response_streaming


def behavior(handler):
    """The function ``handler`` runs, whatever its shape."""
    return {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[shape(handler)]


def like(handler, fn, request_deserializer=None, response_serializer=None):
    """A handler of ``handler``'s shape that runs ``fn``."""
    return _MAKERS[shape(handler)](fn, request_deserializer=request_deserializer, response_serializer=response_serializer)
