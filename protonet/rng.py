"""Caffe's random numbers, bit for bit: one `boost::mt19937` per Caffe::RNG, seeded as
Caffe seeds it, and Boost 1.74's distributions turning its 32-bit words into numbers.

What Caffe draws, and how (BVLC master, CPU path; see docs/rng.md):
- `Caffe::set_random_seed(s)` (pycaffe's `set_random_seed`, the solver's
  `random_seed + rank`) makes the thread's generator `mt19937(s mod 2**32)`;
  unseeded, Caffe seeds it from /dev/urandom.
- `caffe_rng_uniform(a, b)` is `uniform_real(a, nextafter(b))`: a word u gives
  `float(u) / 2**32 * (b' - a) + a` in the blob's precision, redrawn when it
  reaches b'.
- `caffe_rng_gaussian(mu, sigma)` is `normal_distribution`: Boost's 128-strip
  ziggurat (one word gives strip, sign and abscissa; a wedge draws one more word,
  the tail draws exponentials from a 256-strip ziggurat), times sigma plus mu.
- `caffe_rng_bernoulli(p)`: `u <= p * (2**32 - 1)` in p's precision; p = 0 draws
  nothing.
- `caffe_rng_rand()` is one word; `DataTransformer::Rand(n)` is a word `% n`;
  `caffe::shuffle` is Fisher-Yates with `uniform_int(0, i)` (bucketed, redrawn).
- Data layers seed generators of their own from the thread's stream (see
  `protonet.data`), and HDF5Data shuffles with `std::random_shuffle`, i.e. glibc's
  `rand()`, which Caffe never seeds (`GlibcRand`).

The generator is numpy's MT19937 given Caffe's seeding (init_genrand), so words come
in bulk; the distributions are vectorised, with the ziggurat's rare slow paths
walked in order, so a 10**7-value filler takes a fraction of a second.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import threading

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_F32 = np.float32
_TWO_M32 = _F32(2.0 ** -32)
_TWO_M24 = _F32(2.0 ** -24)
_F32_MAX = np.finfo(np.float32).max


def _doubles(text: str) -> np.ndarray:
    return np.array([float.fromhex(t) for t in text.split()], dtype=np.float64)


# Boost.Random's ziggurat tables (normal: 128 strips, exponential: 256), recomputed
# by tools/ziggurat_tables.py: x falls from the base strip's width to 0, y = f(x).
_NORMAL_X = _doubles("""
    0x1.db4668fe7d167p+1 0x1.b8a7c476d1741p+1 0x1.9c8e0c7c7f35ep+1 0x1.8aa73e440e862p+1
    0x1.7d45eb36e9ff4p+1 0x1.7279dd4ac2679p+1 0x1.695c2be68d3e4p+1 0x1.616dff7c8dab3p+1
    0x1.5a61edf7e73f4p+1 0x1.540520129e8c8p+1 0x1.4e3456b0e1da8p+1 0x1.48d61806d430cp+1
    0x1.43d75b60bac8dp+1 0x1.3f29848d395fep+1 0x1.3ac11b8e1e839p+1 0x1.3694f3a3721bap+1
    0x1.329d9725e1358p+1 0x1.2ed4df8097554p+1 0x1.2b35aa5ebcda5p+1 0x1.27bba2b5d9b7dp+1
    0x1.246317a6b3231p+1 0x1.2128dd36bbd01p+1 0x1.1e0a342cee675p+1 0x1.1b04b731f48d4p+1
    0x1.18164be0bf8c9p+1 0x1.153d16d455057p+1 0x1.1277720181096p+1 0x1.0fc3e4d95cda5p+1
    0x1.0d211dd288ac4p+1 0x1.0a8ded0ec1159p+1 0x1.08093fe3e1aa9p+1 0x1.05921d1c4b0b9p+1
    0x1.0327a1cc4a836p+1 0x1.00c8fea16f933p+1 0x1.fceaeb2ca0ee2p+0 0x1.f858aff317ac8p+0
    0x1.f3da09745b605p+0 0x1.ef6dcddc7807dp+0 0x1.eb12e914817afp+0 0x1.e6c85a8495b0dp+0
    0x1.e28d331c61c36p+0 0x1.de609397db2b3p+0 0x1.da41aaf794b3cp+0 0x1.d62fb5257b279p+0
    0x1.d229f9bfe95c7p+0 0x1.ce2fcb05f3115p+0 0x1.ca4084e08c207p+0 0x1.c65b8c04d5d84p+0
    0x1.c2804d2c6531dp+0 0x1.beae3c60c7179p+0 0x1.bae4d457e8092p+0 0x1.b72395df55593p+0
    0x1.b36a075492a98p+0 0x1.afb7b428f83acp+0 0x1.ac0c2c6fbfe60p+0 0x1.a8670475107fbp+0
    0x1.a4c7d45cfb2a5p+0 0x1.a12e37c97caa0p+0 0x1.9d99cd86aeea8p+0 0x1.9a0a373c6d3ccp+0
    0x1.967f1924c0e62p+0 0x1.92f819c67bdfdp+0 0x1.8f74e1b375764p+0 0x1.8bf51b49e8281p+0
    0x1.8878727879e86p+0 0x1.84fe948480027p+0 0x1.81872fd216669p+0 0x1.7e11f3ada7506p+0
    0x1.7a9e9016840d7p+0 0x1.772cb58a3242ap+0 0x1.73bc14d01277fp+0 0x1.704c5ec504e8fp+0
    0x1.6cdd4426b0a02p+0 0x1.696e755e0eb23p+0 0x1.65ffa248d7f43p+0 0x1.62907a016eac0p+0
    0x1.5f20aaa4d7638p+0 0x1.5bafe1164c044p+0 0x1.583dc8bfea848p+0 0x1.54ca0b4ff476ap+0
    0x1.5154507206658p+0 0x1.4ddc3d839cb58p+0 0x1.4a6175432745fp+0 0x1.46e39778d4ba1p+0
    0x1.4362409821672p+0 0x1.3fdd0959138fbp+0 0x1.3c538647e5b53p+0 0x1.38c54749af146p+0
    0x1.3531d71460289p+0 0x1.3198ba9823477p+0 0x1.2df97057dd75fp+0 0x1.2a536fae26375p+0
    0x1.26a627fb9231dp+0 0x1.22f0ffba96ce9p+0 0x1.1f33537495bfap+0 0x1.1b6c7492bde7ap+0
    0x1.179ba80458345p+0 0x1.13c024b2bbdffp+0 0x1.0fd911b972d18p+0 0x1.0be58456f2afcp+0
    0x1.07e47d879726ep+0 0x1.03d4e7390f210p+0 0x1.ff6b21ffe30ecp-1 0x1.f70a5866ad189p-1
    0x1.ee848e954b85cp-1 0x1.e5d6909f34423p-1 0x1.dcfccc51a7480p-1 0x1.d3f340dd86c6bp-1
    0x1.cab56ac6833a5p-1 0x1.c13e2b012d149p-1 0x1.b787a7c4f44a4p-1 0x1.ad8b25067d385p-1
    0x1.a340d1bad0391p-1 0x1.989f85c72c985p-1 0x1.8d9c6a9d0cf67p-1 0x1.822a858ac5ecap-1
    0x1.763a1600c1764p-1 0x1.69b7b213c3f64p-1 0x1.5c8afdbecef6ep-1 0x1.4e94c08bd4d78p-1
    0x1.3fabee18d682fp-1 0x1.2f98d6bb0e73ap-1 0x1.1e0ce6b54ec53p-1 0x1.0a936da5942d2p-1
    0x1.e8e576e3830fap-2 0x1.b4c8fecd63b02p-2 0x1.73949183add9dp-2 0x1.16db47dfb32bdp-2
    0x0.0p+0
""")
_NORMAL_Y = _doubles("""
    0x0.0p+0 0x1.5de9e33733182p-9 0x1.6ba8b0ffc2db8p-8 0x1.1a9b6b3fcb829p-7
    0x1.83f4bed1a0f0bp-7 0x1.f100847656bf0p-7 0x1.309cee4e1477cp-6 0x1.6a23fa9d6c22fp-6
    0x1.a4f57a25e8f32p-6 0x1.e0f951d58f849p-6 0x1.0f0e539c938c0p-5 0x1.2e282b7255da2p-5
    0x1.4dc3fcbda5a08p-5 0x1.6ddc9dd20b8c5p-5 0x1.8e6db483cac0fp-5 0x1.af738c17b4ea1p-5
    0x1.d0eaf633a6b8ap-5 0x1.f2d13368cf93fp-5 0x1.0a91f0918dae5p-4 0x1.1bf075c21538ap-4
    0x1.2d834113457cbp-4 0x1.3f49878976d30p-4 0x1.514297b246583p-4 0x1.636dd69e998c6p-4
    0x1.75cabd60f402ap-4 0x1.8858d6f55ed84p-4 0x1.9b17be7e73957p-4 0x1.ae071dc7bf93dp-4
    0x1.c126ac0128a82p-4 0x1.d4762ca995a18p-4 0x1.e7f56ea118c48p-4 0x1.fba44b5c61816p-4
    0x1.07c1531a357f8p-3 0x1.11c835e726135p-3 0x1.1be6c8cbe5a43p-3 0x1.261d0aaaf7624p-3
    0x1.306afe619efedp-3 0x1.3ad0aa9de455dp-3 0x1.454e19baadb54p-3 0x1.4fe359a145658p-3
    0x1.5a907bafba9e3p-3 0x1.655594a3a5050p-3 0x1.7032bc88e51fap-3 0x1.7b280eac0c6f7p-3
    0x1.8635a99025d7bp-3 0x1.915baee7a2dddp-3 0x1.9c9a43903cae2p-3 0x1.a7f18f91a0d6ap-3
    0x1.b361be1ec9a67p-3 0x1.beeafd99e93b6p-3 0x1.ca8d7f9ad4b43p-3 0x1.d64978f7e2d92p-3
    0x1.e21f21d136fa3p-3 0x1.ee0eb59e75db3p-3 0x1.fa18733ee75d5p-3 0x1.031e4e8606256p-2
    0x1.093dbc775a1f7p-2 0x1.0f6aa83b52201p-2 0x1.15a5387a71a06p-2 0x1.1bed95cc633cbp-2
    0x1.2243eac7ee400p-2 0x1.28a864146d917p-2 0x1.2f1b307cdcc47p-2 0x1.359c810492f8ep-2
    0x1.3c2c88fdc65e7p-2 0x1.42cb7e21f69bfp-2 0x1.497998ac6017ap-2 0x1.503713769e39cp-2
    0x1.57042c17a74d2p-2 0x1.5de1230551a9bp-2 0x1.64ce3bb89770ep-2 0x1.6bcbbcd4d4694p-2
    0x1.72d9f052408ddp-2 0x1.79f923abf1d11p-2 0x1.8129a811b882ep-2 0x1.886bd29e33e65p-2
    0x1.8fbffc918800bp-2 0x1.972683912ac18p-2 0x1.9e9fc9ed4d931p-2 0x1.a62c36ec797eap-2
    0x1.adcc371e07b84p-2 0x1.b5803cb437071p-2 0x1.bd48bfe6b8a90p-2 0x1.c5263f5ead9fcp-2
    0x1.cd1940ad30932p-2 0x1.d52250cdb191ep-2 0x1.dd4204b59916bp-2 0x1.e578f9f2e03a3p-2
    0x1.edc7d75b8e9bep-2 0x1.f62f4dd05d60fp-2 0x1.feb019151c56ep-2 0x1.03a58060f304ap-1
    0x1.08006ca85ac6ap-1 0x1.0c6942a5c900fp-1 0x1.10e07b50236c1p-1 0x1.1566980fc6949p-1
    0x1.19fc2397562a2p-1 0x1.1ea1b2d9fe534p-1 0x1.2357e62437dc2p-1 0x1.281f6a5d33891p-1
    0x1.2cf8fa7868c02p-1 0x1.31e5612075dadp-1 0x1.36e57aa6a89b9p-1 0x1.3bfa3745495cdp-1
    0x1.41249dc6579c8p-1 0x1.4665cea512cc7p-1 0x1.4bbf07c6d4684p-1 0x1.5131a8eff8ed9p-1
    0x1.56bf3924ad864p-1 0x1.5c696d34a27fdp-1 0x1.62322fc5a83b3p-1 0x1.681bab4ed2ff3p-1
    0x1.6e2856a01cb2ap-1 0x1.745b04d03ea40p-1 0x1.7ab6f9c66e43bp-1 0x1.81400521b52b5p-1
    0x1.87faa61a8cfa0p-1 0x1.8eec3c5bda1f6p-1 0x1.961b4c1b19f30p-1 0x1.9d8fdfaee4af6p-1
    0x1.a55418112ba08p-1 0x1.ad750b7275dd0p-1 0x1.b6042cf926211p-1 0x1.bf19b6813348bp-1
    0x1.c8d923fa0897bp-1 0x1.d37a74ffe486ap-1 0x1.df6071937f4c9p-1 0x1.ed5cf061144dep-1
    0x1.0000000000000p+0
""")
_EXPONENTIAL_X = _doubles("""
    0x1.164ec94bf5dc1p+3 0x1.ec9d9297ebb83p+2 0x1.bc39e51da71fcp+2 0x1.9e9dc0d487b85p+2
    0x1.8939fe6f2ed19p+2 0x1.78750d6eac62fp+2 0x1.6aa676d4bbf72p+2 0x1.5ee7ae17313d2p+2
    0x1.54ad83ccf73f6p+2 0x1.4b9d7cd4751d1p+2 0x1.4379766e41362p+2 0x1.3c14ec7c8b861p+2
    0x1.354ee27ccf75ep+2 0x1.2f0e38a4411f0p+2 0x1.293f5ae49aaa5p+2 0x1.23d2bb659919fp+2
    0x1.1ebbca0c9fa7cp+2 0x1.19f03bcb3c2d6p+2 0x1.156786775442ap+2 0x1.111a8034392a6p+2
    0x1.0d031785d48a0p+2 0x1.091c1cdcba54ep+2 0x1.056118bf58eefp+2 0x1.01ce2b362ec2ep+2
    0x1.fcbfe43f6c6e5p+1 0x1.f626e9791f7a7p+1 0x1.efcc26750ea4ap+1 0x1.e9aaf2af383c1p+1
    0x1.e3bf26e190960p+1 0x1.de050af4ef19fp+1 0x1.d87946fec3becp+1 0x1.d318d6b2738c5p+1
    0x1.cde0fecf2a97fp+1 0x1.c8cf442c8c8f4p+1 0x1.c3e1641c2e0a7p+1 0x1.bf154de4bef77p+1
    0x1.ba691d276da5ep+1 0x1.b5db15091ea0fp+1 0x1.b1699c003b60ap+1 0x1.ad13382d845c4p+1
    0x1.a8d68c2ad86eap+1 0x1.a4b2543e84c3bp+1 0x1.a0a563e49f178p+1 0x1.9caea3a24d9eap+1
    0x1.98cd0f18d1ad8p+1 0x1.94ffb34fc2a0ep+1 0x1.9145ad2f37544p+1 0x1.8d9e2823b3695p+1
    0x1.8a085ce695babp+1 0x1.8683906687342p+1 0x1.830f12cc0bec3p+1 0x1.7faa3e96e1412p+1
    0x1.7c5477d1476d3p+1 0x1.790d2b56b71f9p+1 0x1.75d3ce2bd71c3p+1 0x1.72a7dce5cd218p+1
    0x1.6f88db1f42507p+1 0x1.6c7652f9a7b1ep+1 0x1.696fd4a9748eep+1 0x1.6674f60c3f432p+1
    0x1.63855247b2e94p+1 0x1.60a0897081879p+1 0x1.5dc640388bd9ep+1 0x1.5af61fa38e107p+1
    0x1.582fd4c1b4461p+1 0x1.5573106f8a75ap+1 0x1.52bf871acaab2p+1 0x1.5014f08b99508p+1
    0x1.4d7307b1cb127p+1 0x1.4ad98a75da14cp+1 0x1.4848398d39432p+1 0x1.45bed851bc92cp+1
    0x1.433d2c9bd42f8p+1 0x1.40c2fe9f5eeadp+1 0x1.3e5018cadded0p+1 0x1.3be447a8d8b83p+1
    0x1.397f59c345143p+1 0x1.37211f88ca856p+1 0x1.34c96b33bc965p+1 0x1.327810b2aa7d0p+1
    0x1.302ce59265965p+1 0x1.2de7c0e962d70p+1 0x1.2ba87b445db51p+1 0x1.296eee942532bp+1
    0x1.273af61c7daa6p+1 0x1.250c6e6403bbap+1 0x1.22e33524fe550p+1 0x1.20bf293f0f4a2p+1
    0x1.1ea02aa9b3370p+1 0x1.1c861a6782a5ap+1 0x1.1a70da7a27820p+1 0x1.18604dd6fae9ep+1
    0x1.1654585c404c1p+1 0x1.144cdec6f3a2bp+1 0x1.1249c6a92154ap+1 0x1.104af660befcep+1
    0x1.0e50550efcfb7p+1 0x1.0c59ca900946fp+1 0x1.0a673f733c819p+1 0x1.08789cf3aad0fp+1
    0x1.068dccf1126dbp+1 0x1.04a6b9e9224a3p+1 0x1.02c34ef11391bp+1 0x1.00e377af911d4p+1
    0x1.fe0e40add09d8p+0 0x1.fa5c6b3efe1e5p+0 0x1.f6b1498515ed0p+0 0x1.f30cb6ea0bc7fp+0
    0x1.ef6e8fc5b9168p+0 0x1.ebd6b154a7678p+0 0x1.e844f9af4237fp+0 0x1.e4b947c16a452p+0
    0x1.e1337b426509bp+0 0x1.ddb374ad2357fp+0 0x1.da391538da50ap+0 0x1.d6c43ed1ea3fep+0
    0x1.d354d4130f2adp+0 0x1.cfeab83ed7180p+0 0x1.cc85cf395a56cp+0 0x1.c925fd82323fbp+0
    0x1.c5cb282eab1a4p+0 0x1.c27534e42e02dp+0 0x1.bf2409d2dfd85p+0 0x1.bbd78db072610p+0
    0x1.b88fa7b324fb6p+0 0x1.b54c3f8cf2542p+0 0x1.b20d3d66e8bb5p+0 0x1.aed289dcaacffp+0
    0x1.ab9c0df81657ap+0 0x1.a869b32d0f30fp+0 0x1.a53b63556c690p+0 0x1.a21108ad0592dp+0
    0x1.9eea8dcdde951p+0 0x1.9bc7ddac7035dp+0 0x1.98a8e3940bbf4p+0 0x1.958d8b235828ap+0
    0x1.9275c048e73e1p+0 0x1.8f616f3fe1513p+0 0x1.8c50848cc6094p+0 0x1.8942ecfa40f54p+0
    0x1.86389596108e7p+0 0x1.83316badfe62ap+0 0x1.802d5ccce7277p+0 0x1.7d2c56b7d17f7p+0
    0x1.7a2e476b1240ap+0 0x1.77331d177d130p+0 0x1.743ac61fa041cp+0 0x1.714531150a9fbp+0
    0x1.6e524cb59a608p+0 0x1.6b6207e8d3cdfp+0 0x1.687451bd3ebeep+0 0x1.65891965c9b8cp+0
    0x1.62a04e3731a2ep+0 0x1.5fb9dfa56cf26p+0 0x1.5cd5bd4119335p+0 0x1.59f3d6b4e9cf9p+0
    0x1.57141bc316f27p+0 0x1.54367c42cb5f8p+0 0x1.515ae81d900fbp+0 0x1.4e814f4cb45eap+0
    0x1.4ba9a1d6b18a4p+0 0x1.48d3cfcc883c4p+0 0x1.45ffc94716ca7p+0 0x1.432d7e6466cd0p+0
    0x1.405cdf44f09c4p+0 0x1.3d8ddc08d336dp+0 0x1.3ac064ccfeffcp+0 0x1.37f469a851af0p+0
    0x1.3529daa8a1ba1p+0 0x1.3260a7cfb7611p+0 0x1.2f98c11031721p+0 0x1.2cd2164a53b5dp+0
    0x1.2a0c9748bcdaap+0 0x1.274833bd0189fp+0 0x1.2484db3c2a329p+0 0x1.21c27d3b10e05p+0
    0x1.1f01090a9c4e2p+0 0x1.1c406dd3d5283p+0 0x1.19809a93d2396p+0 0x1.16c17e1777ffbp+0
    0x1.140306f707dbep+0 0x1.114523917ac15p+0 0x1.0e87c207a2f66p+0 0x1.0bcad03710137p+0
    0x1.090e3bb4b0072p+0 0x1.0651f1c7276f8p+0 0x1.0395df60db162p+0 0x1.00d9f119a3cd9p+0
    0x1.fc3c26504a9a1p-1 0x1.f6c462b57feb5p-1 0x1.f14c6e202949fp-1 0x1.ebd41e5e21b62p-1
    0x1.e65b483cf1044p-1 0x1.e0e1bf77c31fep-1 0x1.db6756a429057p-1 0x1.d5ebdf1d86b8dp-1
    0x1.d06f28ef0e6fbp-1 0x1.caf102bc25adbp-1 0x1.c57139a70d29fp-1 0x1.bfef99359fe99p-1
    0x1.ba6beb33f8f89p-1 0x1.b4e5f794c979bp-1 0x1.af5d844f224c9p-1 0x1.a9d255396d261p-1
    0x1.a4442be14884ap-1 0x1.9eb2c75ff03bfp-1 0x1.991de42ad1338p-1 0x1.93853bdfda244p-1
    0x1.8de8850d0c52ap-1 0x1.884772f2be1ecp-1 0x1.82a1b53fed599p-1 0x1.7cf6f7c7e8172p-1
    0x1.7746e23077973p-1 0x1.71911797990bbp-1 0x1.6bd5362faa944p-1 0x1.6612d6d0c68e0p-1
    0x1.60498c7dd2ecfp-1 0x1.5a78e3db8befdp-1 0x1.54a0629786f4dp-1 0x1.4ebf86bcd0b93p-1
    0x1.48d5c5f35e712p-1 0x1.42e28ca706748p-1 0x1.3ce53d12162a0p-1 0x1.36dd2e26d8202p-1
    0x1.30c9aa526da4bp-1 0x1.2aa9ee123680bp-1 0x1.247d26538ff2ep-1 0x1.1e426e93e49e7p-1
    0x1.17f8ceb4bdfa0p-1 0x1.119f38749f5afp-1 0x1.0b348479b80fcp-1 0x1.04b76ed6a7558p-1
    0x1.fc4d25d683209p-2 0x1.ef00ccf5f4faap-2 0x1.e186678f1735ap-2 0x1.d3da24df17c36p-2
    0x1.c5f7bd78c3f89p-2 0x1.b7da5dddda3c4p-2 0x1.a97c8be5d5203p-2 0x1.9ad80552237d2p-2
    0x1.8be5954d3606fp-2 0x1.7c9cdda17d019p-2 0x1.6cf40f0a72bbdp-2 0x1.5cdf89d024ac3p-2
    0x1.4c515c60bfe21p-2 0x1.3b388fe3d6ecap-2 0x1.2980290da2633p-2 0x1.170db24d6f670p-2
    0x1.03bf049c65c3cp-2 0x1.decd8b76dbd98p-3 0x1.b38d1ef79b7ccp-3 0x1.85090fbc27a80p-3
    0x1.522e6e54a2a73p-3 0x1.19335a95b8dbap-3 0x1.ad6b2495b4d2bp-4 0x1.0589d8b5d4119p-4
    0x0.0p+0
""")
_EXPONENTIAL_Y = _doubles("""
    0x0.0p+0 0x1.dc31c329f0b4bp-12 0x1.fb20af78dfcb9p-11 0x1.92bb5540c3e25p-10
    0x1.1946ba8e1a324p-9 0x1.6d888f3a1feffp-9 0x1.c58b381cd4b11p-9 0x1.1073d69574043p-8
    0x1.3fa97cee322fdp-8 0x1.7049f37ec3620p-8 0x1.a23e9d4974836p-8 0x1.d5751fa745dc5p-8
    0x1.04ef2295fd7f9p-7 0x1.1fb69edb37671p-7 0x1.3b0b8c1516f62p-7 0x1.56e930be416cbp-7
    0x1.734b6e6aa74f5p-7 0x1.902ea688fa7bdp-7 0x1.ad8fa5542c92dp-7 0x1.cb6b9146e2757p-7
    0x1.e9bfdde89c7cep-7 0x1.04452091e02f0p-6 0x1.13e4554725f5fp-6 0x1.23bc9e1b93a32p-6
    0x1.33cd225315d84p-6 0x1.44151ce87f0bep-6 0x1.5493da6ab0251p-6 0x1.6548b72a24077p-6
    0x1.76331da87fc96p-6 0x1.8752853ec9967p-6 0x1.98a670f132a48p-6 0x1.aa2e6e6924e9bp-6
    0x1.bbea150fa5870p-6 0x1.cdd9054331b0cp-6 0x1.dffae7a517468p-6 0x1.f24f6c7af9890p-6
    0x1.026b2590dfaeep-5 0x1.0bc7a0c7cd651p-5 0x1.153d09f19b3a1p-5 0x1.1ecb45ff312d4p-5
    0x1.28723c956c00cp-5 0x1.3231d7e3f14aep-5 0x1.3c0a047ff18ffp-5 0x1.45fab14266b19p-5
    0x1.5003cf296c5ebp-5 0x1.5a25513c5d2cap-5 0x1.645f2c726a041p-5 0x1.6eb1579b6af52p-5
    0x1.791bcb4ab089ep-5 0x1.839e81c3a396bp-5 0x1.8e3976e80776dp-5 0x1.98eca827b7c4cp-5
    0x1.a3b81471bf138p-5 0x1.ae9bbc26a8084p-5 0x1.b997a10bed985p-5 0x1.c4abc640721e9p-5
    0x1.cfd83031e794ap-5 0x1.db1ce49315810p-5 0x1.e679ea52eb2e5p-5 0x1.f1ef49944e834p-5
    0x1.fd7d0ba699676p-5 0x1.04919d7f5c817p-4 0x1.0a70f19871b3bp-4 0x1.105c88756ca50p-4
    0x1.165468f755392p-4 0x1.1c589a86fa340p-4 0x1.22692512c9d8cp-4 0x1.2886110ce0570p-4
    0x1.2eaf676948dd1p-4 0x1.34e5319c6e718p-4 0x1.3b277999b9f9ep-4 0x1.417649d25b10ep-4
    0x1.47d1ad343985cp-4 0x1.4e39af290d929p-4 0x1.54ae5b959d036p-4 0x1.5b2fbed91bb3ep-4
    0x1.61bde5ccadef7p-4 0x1.6858ddc30b620p-4 0x1.6f00b488416b6p-4 0x1.75b5786193c1ep-4
    0x1.7c77380d7a6f3p-4 0x1.834602c3bc4bap-4 0x1.8a21e835a533bp-4 0x1.910af88e574b9p-4
    0x1.9801447336b70p-4 0x1.9f04dd046f428p-4 0x1.a615d3dd938b7p-4 0x1.ad343b1655465p-4
    0x1.b460254356548p-4 0x1.bb99a5771268fp-4 0x1.c2e0cf42e10afp-4 0x1.ca35b6b80fd57p-4
    0x1.d198706914dd7p-4 0x1.d909116ad9398p-4 0x1.e087af561bafbp-4 0x1.e8146048eb9ccp-4
    0x1.efaf3ae83c33cp-4 0x1.f758566190414p-4 0x1.ff0fca6cbea8dp-4 0x1.036ad7a6e7f04p-3
    0x1.07550eeb7a5bep-3 0x1.0b4697b54b62fp-3 0x1.0f3f7efec1720p-3 0x1.133fd20c9712fp-3
    0x1.17479e6f0ae78p-3 0x1.1b56f2031d666p-3 0x1.1f6ddaf3dca65p-3 0x1.238c67bbbe878p-3
    0x1.27b2a72609940p-3 0x1.2be0a8504cf34p-3 0x1.30167aabe7d6ep-3 0x1.34542dffa0cafp-3
    0x1.3899d2694d5c9p-3 0x1.3ce7785f8a905p-3 0x1.413d30b386a9ap-3 0x1.459b0c92dccc6p-3
    0x1.4a011d8983096p-3 0x1.4e6f7583cb6fap-3 0x1.52e626d078c49p-3 0x1.57654422e78f5p-3
    0x1.5bece0954c2b6p-3 0x1.607d0fab06a31p-3 0x1.6515e5530d1acp-3 0x1.69b775ea6da28p-3
    0x1.6e61d63ee84eap-3 0x1.73151b91a2839p-3 0x1.77d15b99f46fep-3 0x1.7c96ac8851baep-3
    0x1.816525094e7e6p-3 0x1.863cdc48c1af9p-3 0x1.8b1de9f5062d5p-3 0x1.900866425bb79p-3
    0x1.94fc69ee692a1p-3 0x1.99fa0e43e1623p-3 0x1.9f016d1e4c512p-3 0x1.a412a0edf5cbcp-3
    0x1.a92dc4bc03c49p-3 0x1.ae52f42eb5b0bp-3 0x1.b3824b8dcef3ep-3 0x1.b8bbe7c72e4a5p-3
    0x1.bdffe67394435p-3 0x1.c34e65db9afeep-3 0x1.c8a784fce1802p-3 0x1.ce0b638f6d09fp-3
    0x1.d37a220b431fdp-3 0x1.d8f3e1ae3eeb8p-3 0x1.de78c48224f39p-3 0x1.e408ed62f83a7p-3
    0x1.e9a48005940f2p-3 0x1.ef4ba0fe8e09bp-3 0x1.f4fe75c963e7ep-3 0x1.fabd24cff9354p-3
    0x1.0043eab93476ap-2 0x1.032f580797c2cp-2 0x1.0620ef05d90d2p-2 0x1.0918c4ee93e13p-2
    0x1.0c16ef88f5333p-2 0x1.0f1b852d9a66cp-2 0x1.12269ccba9fbap-2 0x1.15384dee291efp-2
    0x1.1850b0c191982p-2 0x1.1b6fde19abc5ap-2 0x1.1e95ef77b09dbp-2 0x1.21c2ff10b7effp-2
    0x1.24f727d4776fdp-2 0x1.2832857457629p-2 0x1.2b75346ae2262p-2 0x1.2ebf520394270p-2
    0x1.3210fc6312435p-2 0x1.356a528fcd0ddp-2 0x1.38cb747b17defp-2 0x1.3c34830abb285p-2
    0x1.3fa5a0230a14ep-2 0x1.431eeeb1841e2p-2 0x1.46a092b80beefp-2 0x1.4a2ab158bdad3p-2
    0x1.4dbd70e26f91dp-2 0x1.5158f8dde89f5p-2 0x1.54fd721bda3e7p-2 0x1.58ab06c3aa9efp-2
    0x1.5c61e2631ee6cp-2 0x1.602231fef5876p-2 0x1.63ec2424827e4p-2 0x1.67bfe8fc60d9fp-2
    0x1.6b9db25e4e99cp-2 0x1.6f85b3e649e9dp-2 0x1.7378230b08deap-2 0x1.77753735e72e3p-2
    0x1.7b7d29dc6801ep-2 0x1.7f90369b6ce59p-2 0x1.83ae9b5446138p-2 0x1.87d8984bc3f8cp-2
    0x1.8c0e704b75d39p-2 0x1.905068c545d04p-2 0x1.949ec9f9a8110p-2 0x1.98f9df2097ba8p-2
    0x1.9d61f695a3792p-2 0x1.a1d76207521f4p-2 0x1.a65a76aa30140p-2 0x1.aaeb8d6fdf6e5p-2
    0x1.af8b03428ef5fp-2 0x1.b43939454806fp-2 0x1.b8f6951990b88p-2 0x1.bdc3812aeeeb5p-2
    0x1.c2a06d00ea583p-2 0x1.c78dcd983fb60p-2 0x1.cc8c1dc40e092p-2 0x1.d19bde97e1a0bp-2
    0x1.d6bd97db9ed7ap-2 0x1.dbf1d88a7210cp-2 0x1.e139375e137fcp-2 0x1.e6945367dd351p-2
    0x1.ec03d4b969d90p-2 0x1.f1886d1eb424dp-2 0x1.f722d8ebfc5fap-2 0x1.fcd3dfe214576p-2
    0x1.014e2b160f324p-1 0x1.043e8ebd26548p-1 0x1.073b931ee3b7dp-1 0x1.0a45b8854d02ap-1
    0x1.0d5d8812b1e2bp-1 0x1.108394a1cc38dp-1 0x1.13b87bc33169cp-1 0x1.16fce6dce6feep-1
    0x1.1a518c71e3b25p-1 0x1.1db7319877b89p-1 0x1.212eaba813ec8p-1 0x1.24b8e228c50a3p-1
    0x1.2856d111132bdp-1 0x1.2c098b61f4f24p-1 0x1.2fd23e345da5ep-1 0x1.33b23450e6318p-1
    0x1.37aada708ddd9p-1 0x1.3bbdc44e1d114p-1 0x1.3fecb2bb18b80p-1 0x1.44399afa8e125p-1
    0x1.48a6afb8ee069p-1 0x1.4d366c151f8afp-1 0x1.51eba1578899ap-1 0x1.56c9882da8773p-1
    0x1.5bd3d694cac75p-1 0x1.610edc1a7af66p-1 0x1.667fa6d4f5c06p-1 0x1.6c2c3498418c6p-1
    0x1.721bb5ba94b63p-1 0x1.7856e9b09d47ep-1 0x1.7ee8a2d243126p-1 0x1.85de87806c5b8p-1
    0x1.8d4a376d3d22fp-1 0x1.95431c455aa39p-1 0x1.9de9715556d9bp-1 0x1.a76baa562fae7p-1
    0x1.b210f0ee67f2ap-1 0x1.be5007beb7b27p-1 0x1.cd0a65081fff1p-1 0x1.e0545e5881137p-1
    0x1.0000000000000p+0
""")

_NX32, _NY32 = _NORMAL_X.astype(_F32), _NORMAL_Y.astype(_F32)
_NDX32 = (_NORMAL_X[:-1] - _NORMAL_X[1:]).astype(_F32)     # RealType(x[i] - x[i+1])
_NDY32 = (_NORMAL_Y[1:] - _NORMAL_Y[:-1]).astype(_F32)     # RealType(y[i+1] - y[i])
_CONVEX = _NORMAL_X[:-1] >= 1
_EX32, _EY32 = _EXPONENTIAL_X.astype(_F32), _EXPONENTIAL_Y.astype(_F32)
_EDX32 = (_EXPONENTIAL_X[:-1] - _EXPONENTIAL_X[1:]).astype(_F32)
_EDY32 = (_EXPONENTIAL_Y[1:] - _EXPONENTIAL_Y[:-1]).astype(_F32)


def _fast_limits() -> tuple[np.ndarray, np.ndarray]:
    """Per low byte of a word (strip i = byte >> 1, sign = bit 0): the word bound below
    which x = (word >> 8) * 2**-24 * x[i] stays under x[i+1] (x grows with the word,
    so a binary search over the 24-bit mantissa finds it), and +-x[i] * 2**-24."""
    lo = np.zeros(128, dtype=np.int64)
    hi = np.full(128, 2**24, dtype=np.int64)       # first m whose x is not below x[i+1]
    while (hi > lo).any():
        mid = (lo + hi) // 2
        x = mid.astype(_F32) * _TWO_M24 * _NX32[:128]
        fast = x.astype(np.float64) < _NORMAL_X[1:]
        lo = np.where(fast, mid + 1, lo)
        hi = np.where(fast, hi, mid)
    strip = np.arange(256) >> 1
    limit = (lo[strip] << 8).astype(np.uint32)
    signed = np.where(np.arange(256) & 1, _NX32[strip], -_NX32[strip]) * _TWO_M24
    return limit, signed.astype(_F32)


_FAST_LIMIT, _SIGNED_X24 = _fast_limits()


def _libm_expf():
    try:
        return ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").expf
    except (OSError, AttributeError):
        return None


_EXPF = _libm_expf()
if _EXPF is not None:
    _EXPF.restype, _EXPF.argtypes = ctypes.c_float, [ctypes.c_float]


def expf(x) -> np.float32:
    """C's expf (what `std::exp(float)` calls in Caffe's build); libm's when it loads."""
    if _EXPF is not None:
        return _F32(_EXPF(float(x)))
    return _F32(np.exp(np.float64(x)))


def _expf_array(x: np.ndarray) -> np.ndarray:
    """expf over an array: exp in double rounded to float32, which is the correctly
    rounded value; glibc's expf is within 0.502 ulp, so it can only round otherwise
    where the exact value sits that close to a halfway point: those few go to libm."""
    exact = np.exp(x.astype(np.float64))
    out = exact.astype(_F32)
    if _EXPF is not None and len(out):
        ulp = np.spacing(out).astype(np.float64)
        halfway = np.abs(np.abs(exact - out.astype(np.float64)) / ulp - 0.5) < 0.01
        for i in np.flatnonzero(halfway).tolist():
            out[i] = expf(x[i])
    return out


def init_genrand(seed: int) -> np.ndarray:
    """mt19937's state after `seed(s)` (Matsumoto and Nishimura's init_genrand, which
    is what boost::mt19937(uint32) does), as numpy's MT19937 key."""
    key = np.empty(624, dtype=np.uint32)
    x = seed & MASK32
    for i in range(624):
        key[i] = x
        x = (1812433253 * (x ^ (x >> 30)) + i + 1) & MASK32
    return key


_CHUNK = 1 << 20     # values per pass: big arrays cost memory traffic, not speed


def _chunked(n: int, draw, dtype) -> np.ndarray:
    """draw(k) for consecutive chunks of n, in stream order, into one array."""
    if n <= _CHUNK:
        return draw(n)
    out = np.empty(n, dtype=dtype)
    for start in range(0, n, _CHUNK):
        out[start:start + _CHUNK] = draw(min(_CHUNK, n - start))
    return out


class _NeedMore(Exception):
    """A block of words ran out in the middle of a draw: retry with a longer one."""


class CaffeRNG:
    """One `boost::mt19937` stream (a Caffe::RNG) with Caffe's distributions.

    Words are taken from numpy's MT19937 in blocks and buffered, so the stream a
    caller sees is exactly mt19937's, in order, however the draws are grouped.
    Methods return float32 numpy arrays (Caffe's float Dtype); one generator is
    used by one thread at a time, as in Caffe.
    """

    def __init__(self, seed: int | None = None):
        if seed is None:                     # Caffe's cluster_seedgen: the system's entropy
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = int(seed) & MASK32
        self._bits = np.random.MT19937(0)
        self._bits.state = {"bit_generator": "MT19937",
                            "state": {"key": init_genrand(self.seed), "pos": 624}}
        self._gen = np.random.Generator(self._bits)
        self._buf = np.empty(0, dtype=np.uint32)
        self._pos = 0

    # -- raw words ------------------------------------------------------------------
    def peek(self, n: int) -> np.ndarray:
        """The next n words (a read-only view), not consumed."""
        have = len(self._buf) - self._pos
        if have < n:
            more = self._gen.integers(0, 2**32, size=max(n - have, 4096), dtype=np.uint32)
            self._buf = np.concatenate([self._buf[self._pos:], more])
            self._pos = 0
        view = self._buf[self._pos:self._pos + n]
        view.flags.writeable = False
        return view

    def skip(self, n: int) -> None:
        """Consume n words (after a peek that covered them)."""
        self.peek(n)
        self._pos += n

    def words(self, n: int) -> np.ndarray:
        """The next n 32-bit outputs (uint32), consumed."""
        out = self.peek(n).copy()
        self._pos += n
        return out

    def rand(self) -> int:
        """caffe_rng_rand(): one word."""
        return int(self.words(1)[0])

    # -- Boost's distributions --------------------------------------------------------
    def _filtered(self, n: int, make, ok) -> np.ndarray:
        """n values of a one-word-per-try sampler, redrawing where `ok` fails."""
        if n == 0:
            return make(self.peek(0))
        if n > _CHUNK:
            return _chunked(n, lambda k: self._filtered(k, make, ok), _F32)
        m = n + 16 + n // 1000
        while True:
            values = make(self.peek(m))
            good = ok(values)
            if good[:n].all():
                self._pos += n
                return values[:n]
            taken = np.flatnonzero(good)
            if len(taken) >= n:
                self._pos += int(taken[n - 1]) + 1
                return values[taken[:n]]
            m *= 2

    def uniform(self, n: int, a: float, b: float) -> np.ndarray:
        """caffe_rng_uniform<float>(n, a, b): uniform_real(a, nextafter(b))."""
        a, hi = _F32(a), np.nextafter(_F32(b), _F32_MAX)
        if not a <= _F32(b):
            raise ValueError(f"uniform: min {a} is above max {b}")
        return self._uniform_real(n, a, hi)

    def _uniform_real(self, n: int, a: np.float32, hi: np.float32) -> np.ndarray:
        if hi / _F32(2) - a / _F32(2) > _F32_MAX / _F32(2):    # Boost halves huge ranges
            return _F32(2) * self._uniform_real(n, a / _F32(2), hi / _F32(2))
        span = _F32(hi - a)
        return self._filtered(n, lambda w: (w.astype(_F32) * _TWO_M32) * span + a,
                              lambda v: v < hi)

    def bernoulli(self, n: int, p: float, double: bool = False) -> np.ndarray:
        """caffe_rng_bernoulli(n, p) as uint8 0/1: `u <= p * (2**32 - 1)` in float32,
        or in double when Caffe passes a double p (Dropout's `1. - threshold_`)."""
        if p == 0:
            return np.zeros(n, dtype=np.uint8)         # Boost draws nothing for p = 0
        if n > _CHUNK:
            return _chunked(n, lambda k: self.bernoulli(k, p, double), np.uint8)
        w = self.words(n)
        if double:
            return (w.astype(np.float64) <= float(p) * 4294967295.0).view(np.uint8)
        return (w.astype(_F32) <= _F32(p) * _F32(4294967295.0)).view(np.uint8)

    def gaussian(self, n: int, mu: float, sigma: float) -> np.ndarray:
        """caffe_rng_gaussian<float>(n, mu, sigma): unit ziggurat * sigma + mu."""
        if not sigma > 0:
            raise ValueError(f"gaussian: std must be positive, got {sigma}")
        return self.unit_normal(n) * _F32(sigma) + _F32(mu)

    def unit_normal(self, n: int) -> np.ndarray:
        """n draws of Boost's unit_normal_distribution<float>, in stream order."""
        return _chunked(n, self._unit_normal_chunk, _F32)

    def _unit_normal_chunk(self, n: int) -> np.ndarray:
        m = n + n // 16 + 64
        while True:
            try:
                return self._unit_normal_block(n, m)
            except _NeedMore:
                m *= 2

    def _unit_normal_block(self, n: int, m: int) -> np.ndarray:
        w = self.peek(m)
        low = w & np.uint32(255)              # strip (bits 1-7) and sign (bit 0)
        fast = w < _FAST_LIMIT[low]           # x < x[i+1]: no further word needed
        values = (w >> np.uint32(8)).astype(_F32) * _SIGNED_X24[low]
        special = np.flatnonzero(~fast)
        if len(special) == 0:
            if m < n:
                raise _NeedMore
            self._pos += n
            return values[:n]
        # Wedges (vectorised): the next word is y01; rejected -> start over two on.
        k = (low[special] >> np.uint32(1)).astype(np.intp)
        xs = np.abs(values[special])
        after = np.minimum(special + 1, m - 1)
        y01 = w[after].astype(_F32) * _TWO_M32
        simple = (k != 0) & (special + 1 < m) & (y01 < _F32(1))
        tx, ty = _NX32[k], _NY32[k]
        y = ty + y01 * _NDY32[k]
        to_edge = _NDX32[k] * y01 - (tx - xs)
        to_tangent = y - (ty + (tx - xs) * ty * tx)
        convex = _CONVEX[k]
        above_upper = np.where(convex, to_edge, to_tangent)
        above_lower = np.where(convex, to_tangent, to_edge)
        f = _expf_array(-(xs * xs / _F32(2)))
        accept = (above_upper < 0) & ((above_lower < 0) | (y < f))
        # Which special words start a draw: one does unless an earlier draw that
        # started ate it. Simple wedges eat one word more, the rest (tails, y01
        # redraws) a few, so only specials close behind another need a sequential
        # look; all others start draws for certain.
        ends = special + 2
        slow = np.flatnonzero(~simple).tolist()
        slow_values: dict[int, np.float32] = {}
        incomplete: set[int] = set()
        for j in slow:
            try:
                value, used = self._normal_slow(w, int(special[j]))
                slow_values[j] = value
                ends[j] = special[j] + used
            except _NeedMore:                    # runs past the block: fine if unused
                incomplete.add(j)
                ends[j] = m + 1
        reach = np.maximum.accumulate(ends)
        doubtful = np.flatnonzero(special[1:] < reach[:-1]) + 1
        starts = np.ones(len(special), dtype=bool)
        for j in doubtful.tolist():
            here, back = special[j], j - 1
            while back >= 0 and reach[back] > here:
                if starts[back] and ends[back] > here:
                    starts[j] = False
                    break
                back -= 1
        # Values: fast words and accepted draws, minus the words draws ate.
        emit = fast.copy()
        started = special[starts]
        emit[started] = accept[starts]
        eaten = starts & simple
        emit[special[eaten] + 1] = False
        for j in slow:
            if starts[j]:
                emit[special[j]] = True
                if j not in incomplete:
                    values[special[j]] = slow_values[j]
                emit[special[j] + 1:min(int(ends[j]), m)] = False
        where = np.flatnonzero(emit[:m])
        if len(where) < n:
            raise _NeedMore
        if n == 0:
            return values[:0]
        last = int(where[n - 1])
        j = int(np.searchsorted(special, last))
        if j < len(special) and special[j] == last:
            if j in incomplete:
                raise _NeedMore
            end = int(ends[j])
        else:
            end = last + 1
        self._pos += end
        return values[where[:n]]

    # -- one value at a time: the rare paths, exactly as Boost loops ------------------
    def _normal_slow(self, w: np.ndarray, start: int) -> tuple[np.float32, int]:
        """unit_normal<float> from word `start` of block w: (value, words used)."""
        at = [start]

        def word() -> int:
            if at[0] >= len(w):
                raise _NeedMore
            at[0] += 1
            return int(w[at[0] - 1])

        def u01() -> np.float32:
            while True:
                v = _F32(word()) * _TWO_M32
                if v < _F32(1):
                    return v

        while True:
            u = word()
            bucket = u & 255
            k, sign = bucket >> 1, _F32(1 if bucket & 1 else -1)
            x = _F32(u >> 8) * _TWO_M24 * _NX32[k]
            if float(x) < _NORMAL_X[k + 1]:
                return x * sign, at[0] - start
            if k == 0:
                return _normal_tail(word, u01) * sign, at[0] - start
            y01 = u01()
            tx, ty = _NX32[k], _NY32[k]
            y = ty + y01 * _NDY32[k]
            to_edge = _NDX32[k] * y01 - (tx - x)
            to_tangent = y - (ty + (tx - x) * ty * tx)
            above_upper, above_lower = (to_edge, to_tangent) if _CONVEX[k] else \
                (to_tangent, to_edge)
            if above_upper < 0 and (above_lower < 0 or y < expf(-(x * x / _F32(2)))):
                return x * sign, at[0] - start

    def uniform_int(self, high: int) -> int:
        """boost::uniform_int(0, high): words bucketed by (2**32 - 1) // (high + 1)."""
        if high == 0:
            return 0
        bucket = _bucket_size(high)
        while True:
            r = self.rand() // bucket
            if r <= high:
                return r

    def shuffle(self, items: list) -> None:
        """caffe::shuffle: Fisher-Yates from the back, j = uniform_int(0, i)."""
        count = len(items)
        if count <= 1:
            return
        js = self.shuffle_indices(count)
        for i, j in zip(range(count - 1, 0, -1), js.tolist()):
            items[i], items[j] = items[j], items[i]

    def shuffle_indices(self, count: int) -> np.ndarray:
        """The j of each swap caffe::shuffle makes for `count` items (i = count-1 .. 1)."""
        highs = np.arange(count - 1, 0, -1, dtype=np.int64)
        out = np.empty(len(highs), dtype=np.int64)
        done = 0
        while done < len(highs):
            step = highs[done:done + 65536]
            bucket = (MASK32 // (step + 1)) + (MASK32 % (step + 1) == step)
            r = self.peek(len(step)).astype(np.int64) // bucket
            bad = np.flatnonzero(r > step)
            good = len(step) if len(bad) == 0 else int(bad[0])
            out[done:done + good] = r[:good]
            self._pos += good
            done += good
            if good < len(step):                   # a redraw: that one alone
                out[done] = self.uniform_int(int(step[good]))
                done += 1
        return out

    def state(self) -> dict:
        """Where the stream stands (seed and words consumed), for debugging."""
        consumed = self._gen.bit_generator.state
        return {"seed": self.seed, "buffered": len(self._buf) - self._pos,
                "numpy_state_pos": consumed["state"]["pos"]}


def _bucket_size(high: int) -> int:
    size = MASK32 // (high + 1)
    return size + 1 if MASK32 % (high + 1) == high else size


def _unit_exponential(word, u01) -> np.float32:
    """Boost's unit_exponential_distribution<float> (256-strip ziggurat)."""
    shift = _F32(0)
    while True:
        u = word()
        k = u & 255
        x = _F32(u >> 8) * _TWO_M24 * _EX32[k]
        if x < _EX32[k + 1]:
            return shift + x
        if k == 0:
            shift = shift + _EX32[1]
            continue
        y01 = u01()
        y = _EY32[k] + y01 * _EDY32[k]
        above_upper = _EDX32[k] * y01 - (_EX32[k] - x)
        above_lower = y - (_EY32[k + 1] + (_EX32[k + 1] - x) * _EY32[k + 1])
        if above_upper < 0 and (above_lower < 0 or y < expf(-x)):
            return x + shift


def _normal_tail(word, u01) -> np.float32:
    """The normal's tail beyond x[1]: exponentials by rejection, as Boost draws them."""
    start = _NX32[1]
    while True:
        x = _unit_exponential(word, u01) / start
        y = _unit_exponential(word, u01) / _F32(1)
        if _F32(2) * y > x * x:
            return x + start


class GlibcRand:
    """glibc's rand() (the TYPE_3 additive generator), which `std::random_shuffle`
    uses and Caffe never seeds: every Caffe process starts from srand(1)."""

    def __init__(self, seed: int = 1):
        r = [0] * 34
        r[0] = seed & 0xFFFFFFFF or 1
        for i in range(1, 31):
            hi, lo = divmod(r[i - 1] if r[i - 1] < 2**31 else r[i - 1] - 2**32, 127773)
            word = 16807 * lo - 2836 * hi
            r[i] = word + 2147483647 if word < 0 else word
        for i in range(31, 34):
            r[i] = r[i - 31]
        self._r = [v & MASK32 for v in r]
        for _ in range(310):
            self._next()

    def _next(self) -> int:
        r = self._r
        value = (r[-31] + r[-3]) & MASK32
        r.append(value)
        if len(r) > 4096:
            del r[:-64]
        return value >> 1

    def rand(self) -> int:
        return self._next()

    def random_shuffle(self, items) -> None:
        """libstdc++'s std::random_shuffle: for i = 1 .. n-1, swap i with rand() % (i+1)."""
        for i in range(1, len(items)):
            j = self._next() % (i + 1)
            if i != j:
                items[i], items[j] = items[j], items[i]


# -- the process's streams, as Caffe keeps them --------------------------------------
_lock = threading.Lock()
_main: CaffeRNG | None = None
_seeded = False
_glibc: GlibcRand | None = None


def caffe_rng() -> CaffeRNG:
    """The stream Caffe's main thread draws from (fillers, Dropout, data layers' seeds):
    seeded by set_random_seed, else from the system's entropy on first use."""
    global _main
    with _lock:
        if _main is None:
            _main = CaffeRNG()
        return _main


def seeded() -> bool:
    """Whether a seed was set: then every draw follows Caffe's CPU stream (Dropout
    included, drawn on the CPU); else draws that have a faster path take it."""
    return _seeded


def child_seed() -> int:
    """A seed for a generator of one's own: Caffe's `caffe_rng_rand()`, one word of
    the main stream. Unseeded, a draw from torch's generator instead, so that
    torch.manual_seed keeps repeating runs as before."""
    if _seeded:
        return caffe_rng().rand()
    return int(torch.randint(0, 2**32, (1,), dtype=torch.int64).item())


def child() -> CaffeRNG:
    """A Caffe::RNG seeded with child_seed() (data transformers, prefetch shuffles)."""
    return CaffeRNG(child_seed())


def rand_mod(limit: int) -> int:
    """`caffe_rng_rand() % limit` from the main stream (rand_skip); unseeded, torch's."""
    if limit <= 0:
        return 0
    if _seeded:
        return caffe_rng().rand() % limit
    return int(torch.randint(0, limit, ()).item())


def glibc_rand() -> GlibcRand:
    """The process's rand() stream (std::random_shuffle in HDF5Data)."""
    global _glibc
    with _lock:
        if _glibc is None:
            _glibc = GlibcRand()
        return _glibc


def reset() -> None:
    """Forget any seed: back to the unseeded state of a fresh process (tests use it)."""
    global _main, _seeded, _glibc
    with _lock:
        _main, _seeded, _glibc = None, False, None


def set_random_seed(seed: int) -> None:
    """Caffe::set_random_seed: the main stream restarts as mt19937(seed mod 2**32).
    The rand() stream restarts at srand(1), where a fresh Caffe process has it (Caffe
    leaves it alone; restarting makes seeded runs in one process repeat), and
    torch's, numpy's and Python's generators (for draws Caffe does not define) are
    seeded too. A negative seed leaves everything as it is."""
    global _main, _seeded, _glibc
    if seed < 0:
        return
    with _lock:
        _main = CaffeRNG(seed)
        _glibc = None
        _seeded = True
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
