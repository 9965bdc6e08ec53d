// The rule of mira_kernels/_config.py for the MIRA_* variables the C++ kernels read themselves
// (MIRA_CPU_ISA, MIRA_CPU_STREAM): surrounding ASCII whitespace stripped, choices case-insensitive,
// unset or empty = the default, on/off switches spelled 1/true/yes/on or 0/false/no/off, anything
// else a ValueError naming the variable, the value and the allowed values. That file is the one
// place the variables are documented; tests/test_config_env.py runs one table of values through both.
#pragma once

#include <c10/util/Exception.h>
#include <unistd.h>  // environ

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace mira {

// The canonical value of variable `name`: one of `choices` ("1" / "0" stand for on / off).
inline std::string env_choice(const char* name, const char* fallback, std::initializer_list<std::string_view> choices) {
  const char* raw = std::getenv(name);
  std::string value = raw ? raw : "";
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  value.erase(value.begin(), std::find_if(value.begin(), value.end(), not_space));
  value.erase(std::find_if(value.rbegin(), value.rend(), not_space).base(), value.end());
  if (value.empty()) return fallback;
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  const bool is_switch = std::find(choices.begin(), choices.end(), "1") != choices.end();
  if (is_switch && (value == "1" || value == "true" || value == "yes" || value == "on")) return "1";
  if (is_switch && (value == "0" || value == "false" || value == "no" || value == "off")) return "0";
  for (std::string_view c : choices)
    if (value == c) return value;
  std::string allowed;
  for (std::string_view c : choices)
    if (c != "1" && c != "0") allowed += (allowed.empty() ? "" : ", ") + std::string(c);
  if (is_switch) allowed += ", on or off (1/true/yes/on or 0/false/no/off)";
  TORCH_CHECK_VALUE(false, name, "='", raw, "' is not valid; expected ", allowed,
                    " (case and surrounding whitespace are ignored)");
}

// Counts, per thread, the changes to the process environment this thread has seen: the array of
// variable pointers (`environ`) compared with a copy of it taken at the last change. setenv, putenv
// and unsetenv (and so every os.environ write) replace, add or remove an entry of that array.
// Why: the kernels read their variables at every call, and getenv compares the name with every
// variable's string; called four times per forward, right after work that has evicted those
// strings from the caches, it cost 3-8 us of a ViT-B/16 qkv call inside the running network (Zen 5,
// 2026-12-06), where this glance reads one contiguous array of ~40 pointers. A string changed in
// place behind an unchanged pointer (a buffer handed to putenv and then edited) is not seen; POSIX
// leaves such edits to the caller, and Python's os.environ never makes them.
inline uint64_t environment_generation() {
  thread_local std::vector<char*> seen{nullptr};  // the array as last seen, its terminating null included
  thread_local uint64_t generation = 1;
  char** const env = environ;
  size_t n = 0;
  while (env != nullptr && env[n] != nullptr) ++n;
  if (n + 1 != seen.size() || !std::equal(env, env + n, seen.begin())) {
    seen.assign(env, env + n);
    seen.push_back(nullptr);
    ++generation;
  }
  return generation;
}

// One variable's env_choice, kept until the environment changes (environment_generation): hold one
// per variable in a thread_local. A value that fails to parse is not kept (each call raises again).
class CachedChoice {
 public:
  const std::string& get(const char* name, const char* fallback, std::initializer_list<std::string_view> choices) {
    const uint64_t now = environment_generation();
    if (now != generation_) {
      value_ = env_choice(name, fallback, choices);
      generation_ = now;
    }
    return value_;
  }

 private:
  uint64_t generation_ = 0;  // 0: never read (environment_generation starts at 1)
  std::string value_;
};

}  // namespace mira
