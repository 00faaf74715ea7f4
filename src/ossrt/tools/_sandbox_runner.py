"""The code run *inside* the sandbox, before the model's code (passed to `python3 -I -c`).

Kept as plain source text: the sandbox's interpreter never imports ossrt. It sets the
resource limits on itself (inside the sandbox's user namespace, where RLIMIT_NPROC counts only
the sandbox's processes), reads the model's code from stdin, points stdin at /dev/null, runs
the code as `__main__`, and, like a notebook cell, prints the repr of a final bare expression.
Tracebacks hide this runner's own frames.
"""

RUNNER = r'''
import sys, os, resource
_cpu, _mem, _nproc, _fsize, _echo = (int(v) for v in sys.argv[1:6])
for _r, _v in ((resource.RLIMIT_CPU, (_cpu, _cpu + 1)), (resource.RLIMIT_AS, (_mem, _mem)),
               (resource.RLIMIT_NPROC, (_nproc, _nproc)), (resource.RLIMIT_FSIZE, (_fsize, _fsize)),
               (resource.RLIMIT_CORE, (0, 0))):
    if _v[0] > 0:
        resource.setrlimit(_r, _v)
_src = sys.stdin.buffer.read().decode("utf-8", "replace")
_fd = os.open(os.devnull, os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
sys.stdin = open(0, closefd=False)
sys.argv = [""]
def _main(src, echo):
    import ast, traceback
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(src, "<stdin>", "exec")
        last = None
        if echo and tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<stdin>", "exec"), g)
        if last is not None:
            value = eval(compile(last, "<stdin>", "eval"), g)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except SyntaxError as e:
        traceback.print_exception(type(e), e, None)
        sys.exit(1)
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        sys.exit(1)
_main(_src, _echo)
'''
