/* Streams a completion from a nanochat GGUF model through the C API.
 *   generate_c MODEL.gguf PROMPT [MAX_TOKENS] */
#include <stdio.h>
#include <stdlib.h>

#include <nanochat/nanochat.h>

static int on_token(int32_t token, const char* piece, size_t len, void* user_data) {
  (void)token;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  ++*(int*)user_data;
  return 0; /* keep going */
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL.gguf PROMPT [MAX_TOKENS]\n", argv[0]);
    return 2;
  }
  nc_model* model = NULL;
  if (nc_model_load(argv[1], &model) != NC_OK) {
    fprintf(stderr, "error: %s\n", nc_last_error());
    return 1;
  }
  nc_session* session = NULL;
  if (nc_session_new(model, 0, &session) != NC_OK) {
    fprintf(stderr, "error: %s\n", nc_last_error());
    nc_model_free(model);
    return 1;
  }
  nc_sampling sp;
  nc_sampling_default(&sp);
  sp.temperature = 0.0f; /* greedy */
  sp.max_tokens = argc > 3 ? atoi(argv[3]) : 64;

  int n = 0;
  nc_generate_stats stats;
  fputs(argv[2], stdout);
  nc_status st = nc_generate(session, argv[2], &sp, on_token, &n, &stats);
  fputs("\n", stdout);
  if (st != NC_OK) fprintf(stderr, "error: %s\n", nc_last_error());
  else
    fprintf(stderr, "%d tokens (%s), %d prompt tokens\n", n, stats.stop_reason,
            stats.prompt_tokens);
  nc_session_free(session);
  nc_model_free(model);
  return st == NC_OK ? 0 : 1;
}
