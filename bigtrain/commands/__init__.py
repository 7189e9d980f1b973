"""The subcommands of ``bigtrain``, one module each: its argparse parser (help, examples) and the
function it runs. :mod:`bigtrain.cli` registers them all to build ``bigtrain --help``, so these
modules load no torch: each command imports the module that does its work inside its function."""
