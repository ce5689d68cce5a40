"""Server strategies, written only against fedsim's public interface (``fedsim.strategy``).

Each module is a complete, small example of how to write your own; select one with
``strategy=<name>`` (``conf/strategy/<name>.yaml`` names the class with ``_target_``).
"""
