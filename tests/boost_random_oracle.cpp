// Draws from the real Boost.Random, as Caffe's CPU code calls it, for
// tests/test_rng.py: mt19937(seed), then n values each of
//   normal_distribution<float>(0.5, 2)            (caffe_rng_gaussian)
//   uniform_real<float>(-1, nextafter(2))         (caffe_rng_uniform)
//   bernoulli_distribution<double>(1. - 0.6f)     (Dropout's caffe_rng_bernoulli)
//   bernoulli_distribution<float>(0.5f)           (the sparse gaussian filler's)
//   uniform_int<long>(0, k) for k = 1 .. n        (caffe::shuffle)
// and one raw word, all written as 32-bit values to argv[3].
#include <boost/math/special_functions/next.hpp>
#include <boost/random/bernoulli_distribution.hpp>
#include <boost/random/mersenne_twister.hpp>
#include <boost/random/normal_distribution.hpp>
#include <boost/random/uniform_int.hpp>
#include <boost/random/uniform_real.hpp>
#include <boost/random/variate_generator.hpp>
#include <cstdio>
#include <cstdlib>
#include <limits>

template <class Dist, class Out>
static void draw(boost::mt19937* rng, Dist dist, int n, FILE* f) {
  boost::variate_generator<boost::mt19937*, Dist> gen(rng, dist);
  for (int i = 0; i < n; ++i) {
    Out v = static_cast<Out>(gen());
    std::fwrite(&v, 4, 1, f);
  }
}

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  boost::mt19937 rng(static_cast<unsigned>(std::strtoul(argv[1], 0, 10)));
  const int n = std::atoi(argv[2]);
  FILE* f = std::fopen(argv[3], "wb");
  if (!f) return 1;
  draw<boost::normal_distribution<float>, float>(
      &rng, boost::normal_distribution<float>(0.5f, 2.0f), n, f);
  const float top = boost::math::nextafter<float>(2.f, std::numeric_limits<float>::max());
  draw<boost::uniform_real<float>, float>(&rng, boost::uniform_real<float>(-1.f, top), n, f);
  draw<boost::bernoulli_distribution<double>, unsigned>(
      &rng, boost::bernoulli_distribution<double>(1. - 0.6f), n, f);
  draw<boost::bernoulli_distribution<float>, unsigned>(
      &rng, boost::bernoulli_distribution<float>(0.5f), n, f);
  for (long k = 1; k <= n; ++k) {
    unsigned v = static_cast<unsigned>(boost::uniform_int<long>(0, k)(rng));
    std::fwrite(&v, 4, 1, f);
  }
  unsigned w = rng();
  std::fwrite(&w, 4, 1, f);
  return std::fclose(f) == 0 ? 0 : 1;
}
