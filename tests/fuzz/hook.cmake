# hook.cmake: adds tests/fuzz to a build whose root CMakeLists.txt does not (yet) do it itself.
# Usage: cmake -B build-fuzz -DCMAKE_C_COMPILER=clang -DSTP_FUZZ=ON \
#          -DCMAKE_PROJECT_INCLUDE=$PWD/tests/fuzz/hook.cmake   (deploy/fuzz.sh decides)
# The include is deferred to the end of the root file, after every target it links exists.
# (EVAL: the path must be expanded now; a deferred call expands its arguments when it runs.)
if(NOT STP_FUZZ_HOOKED)
  set(STP_FUZZ_HOOKED ON)
  cmake_language(EVAL CODE
    "cmake_language(DEFER DIRECTORY [[${CMAKE_SOURCE_DIR}]] CALL include [[${CMAKE_CURRENT_LIST_DIR}/CMakeLists.txt]])")
endif()
