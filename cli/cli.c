/* stpipe: the command-line front end. Dispatches to a subcommand (cli_<name>.c). */
#include "cli.h"
#include "cli_pipeline.h"

#include <stdio.h>
#include <string.h>

typedef struct cli_cmd {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} cli_cmd;

static const cli_cmd s_cmds[] = {
    {"generate", cli_generate, "generate text from a prompt (in-process or --pipeline RUN_DIR)"},
    {"stats", cli_stats, "show pipeline stage statistics (--run-dir DIR [--watch] [--json])"},
    {"info", cli_info, "show a model's architecture, tensors and memory needs"},
    {"tokenize", cli_tokenize, "print the token ids of a text"},
    {"detokenize", cli_detokenize, "print the text of token ids"},
    {"chat", cli_chat, "interactive chat with history (in-process)"},
    {"serve", cli_serve, "OpenAI-compatible HTTP server (chat/completions, streaming, metrics)"},
    {"bench", cli_bench, "measure prompt and generation throughput (like llama-bench)"},
};

static void s_usage(FILE *out) {
    fprintf(out,
            "usage: stpipe COMMAND [options]   (stpipe COMMAND --help for details)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof s_cmds / sizeof s_cmds[0]; i++)
        fprintf(out, "  %-12s %s\n", s_cmds[i].name, s_cmds[i].help);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        s_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof s_cmds / sizeof s_cmds[0]; i++)
        if (!strcmp(argv[1], s_cmds[i].name)) return s_cmds[i].run(argc - 1, argv + 1);
    fprintf(stderr, "stpipe: unknown command '%s'\n", argv[1]);
    s_usage(stderr);
    return 2;
}
